"""Kill-and-resume of training: ``train_lm`` is SIGKILLed at random moments (each after it has written a new
checkpoint), the checkpoint left behind must load, and the run resumed to completion must end with exactly the
same weights, final loss and trace as an uninterrupted run.

Training runs in child processes forked from a multiprocessing *forkserver* whose interpreter has imported torch,
transformers and lmshrink but run nothing, so each child starts in milliseconds instead of re-importing (seconds on
a busy machine). ``Process.kill()`` is a real SIGKILL: no ``finally``, no ``atexit``.

Run directly (``python tests/test_kill_resume.py OUT_DIR``) to train one run (resuming if a checkpoint exists).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import random
import signal
import sys
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import pytest
import torch

#: modules the forkserver imports once (the same list as tests/test_determinism.py, which may start it first)
PRELOAD = [
    "torch",
    "transformers",
    "transformers.models.llama.modeling_llama",
    "lmshrink.models",
    "lmshrink.distillation.trainer",
    "lmshrink.quantization.api",
    "lmshrink.pruning.api",
    "lmshrink.evaluation",
]
STEPS = 24
KILLS = 5  # kill points per test run
SEED = 20261123  # the kill moments are random but reproducible
TRACE_KEYS = ("epoch", "step", "loss", "accuracy", "val_loss", "val_ppl", "val_accuracy", "lr", "tokens")


def _ids(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.arange(n) % 17  # a learnable stream: a noisy repeating pattern
    return torch.where(torch.rand(n, generator=g) < 0.2, torch.randint(0, 64, (n,), generator=g), base)


def train(out: Path) -> None:
    """One tiny training run into ``out`` (resumes from ``out/checkpoint`` when present)."""
    from lmshrink.distillation.teacher import build_llama
    from lmshrink.distillation.trainer import TrainConfig, train_lm

    torch.set_num_threads(1)
    cfg = TrainConfig(
        steps=STEPS,
        batch_size=4,
        seq_len=16,
        lr=3e-3,
        warmup_steps=2,
        checkpoint_every=2,
        trace_every=4,
        progress=False,
        val_max_tokens=64,
    )
    train_lm(build_llama(64, 32, 2, 2, 64, 32, seed=0), _ids(16 * 40, 0), cfg, out, val_ids=_ids(128, 1))


def _context() -> Any:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _start(out: Path) -> BaseProcess:
    script = Path(__file__).resolve()
    code = (
        "import runpy, sys, threading, tqdm\n"
        "tqdm.tqdm.set_lock(threading.RLock())\n"  # no multiprocessing lock for a SIGKILL to leak
        f"sys.argv = {[str(script), str(out)]!r}\n"
        f"runpy.run_path({str(script)!r}, run_name='__main__')\n"
    )
    proc = _context().Process(target=exec, args=(code, {}), daemon=True)
    proc.start()
    return proc


def _checkpoint_step(out: Path) -> int | None:
    try:
        return int(json.loads((out / "checkpoint" / "state.json").read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError):
        return None


def _load_checkpoint(out: Path) -> dict[str, Any]:
    """Load the checkpoint into a fresh model and optimizer (checksums verified); return its state."""
    from lmshrink.distillation.checkpoint import load_checkpoint
    from lmshrink.distillation.teacher import build_llama
    from lmshrink.distillation.trainer import TrainConfig, _make_optimizer

    model = build_llama(64, 32, 2, 2, 64, 32, seed=0)
    rng = torch.get_rng_state()  # load_checkpoint restores the RNG; keep this process's
    try:
        return load_checkpoint(out / "checkpoint", model, _make_optimizer(model, TrainConfig()))
    finally:
        torch.set_rng_state(rng)


def _final(out: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    result = json.loads((out / "result.json").read_text(encoding="utf-8"))
    return result, load_file(str(out / "checkpoint" / "model.safetensors"))


@pytest.mark.slow  # timing-dependent kill points: run with `make test-slow`
def test_sigkill_at_random_moments_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    rnd = random.Random(SEED)
    ref = _start(tmp_path / "ref")  # the uninterrupted run, in the same kind of child process
    ref.join(120)
    assert ref.exitcode == 0, f"uninterrupted run failed (exit code {ref.exitcode})"

    out = tmp_path / "killed"
    kills: list[dict[str, Any]] = []
    for _attempt in range(KILLS * 3):
        if len(kills) == KILLS:
            break
        before = _checkpoint_step(out) or 0
        proc = _start(out)
        deadline = time.monotonic() + 60
        # wait until this life has written a new checkpoint, then kill after a random delay
        while (_checkpoint_step(out) or 0) <= before and proc.is_alive() and time.monotonic() < deadline:
            time.sleep(0.002)
        delay = rnd.uniform(0.0, 0.15)
        time.sleep(delay)
        if not proc.is_alive():  # finished (or failed) before the kill: start over from the checkpoint
            proc.join()
            assert proc.exitcode == 0, f"training child failed (exit code {proc.exitcode})"
            if _checkpoint_step(out) == STEPS:
                break
            continue
        proc.kill()
        proc.join(30)
        assert proc.exitcode == -signal.SIGKILL
        step = _checkpoint_step(out)
        assert step is not None, f"after a SIGKILL {delay * 1000:.0f} ms after a checkpoint, none is left"
        assert step >= before, "the checkpoint went backwards"
        state = _load_checkpoint(out)  # checksums verified, model + optimizer state fit
        assert state["step"] == step
        kills.append({"checkpoint_step": step, "delay_ms": round(delay * 1000, 1)})
        if step == STEPS:
            break
    assert len(kills) >= 3, f"only {len(kills)} kill points were hit: {kills}"

    last = _checkpoint_step(out)
    final = _start(out)  # resume to completion
    final.join(120)
    assert final.exitcode == 0
    res_ref, w_ref = _final(tmp_path / "ref")
    res, w = _final(out)
    assert res["steps"] == res_ref["steps"] == STEPS
    assert res_ref["resumed_from_step"] is None and res["resumed_from_step"] == last
    assert res["final_loss"] == res_ref["final_loss"]  # exact: CPU training is deterministic
    strip = [{k: row[k] for k in TRACE_KEYS if k in row} for row in res["trace"]]
    strip_ref = [{k: row[k] for k in TRACE_KEYS if k in row} for row in res_ref["trace"]]
    assert strip == strip_ref
    assert sorted(w) == sorted(w_ref)
    assert all(torch.equal(w[k], w_ref[k]) for k in w), "resumed weights differ from the uninterrupted run"
    # temporary checkpoint directories of killed saves are left behind (nothing can clean up after SIGKILL); they
    # never shadow the real checkpoint, and are reported here
    leftovers = sorted(p.name for p in out.iterdir() if p.name.startswith(".checkpoint."))
    print(f"kill points: {kills}; leftover temporary directories: {leftovers}")


if __name__ == "__main__":
    train(Path(sys.argv[1]))
