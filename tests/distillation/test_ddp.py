"""Data parallelism: 2 CPU processes on gloo, micro-batch 2 each, match 1 process with micro-batch 4."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from lmshrink.distillation.teacher import build_llama
from lmshrink.distillation.trainer import TrainConfig, train_lm


def _ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 64, (16 * 24,), generator=g)


def _cfg(batch_size: int) -> TrainConfig:
    return TrainConfig(
        steps=5,
        batch_size=batch_size,
        seq_len=16,
        lr=3e-3,
        warmup_steps=1,
        progress=False,
        device="cpu",
        val_max_tokens=64,
    )


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    from lmshrink.distillation.ddp import process_group

    torch.set_num_threads(1)
    with process_group(rank, world, init_file) as ctx:
        assert ctx.world_size == world
        res = train_lm(build_llama(64, 32, 2, 2, 64, 32, seed=0), _ids(), _cfg(2), out, val_ids=_ids()[:64])
        assert res.world_size == world


def test_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    single = train_lm(
        build_llama(64, 32, 2, 2, 64, 32, seed=0), _ids(), _cfg(4), tmp_path / "one", val_ids=_ids()[:64]
    )
    # fork: the workers inherit the imported libraries (a spawned worker re-imports transformers, ~10-20 s)
    mp.start_processes(
        _worker, args=(2, str(tmp_path / "pg"), str(tmp_path / "two")), nprocs=2, start_method="fork"
    )
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert two["world_size"] == 2 and two["tokens"] == single.tokens
    assert two["final_loss"] == pytest.approx(single.final_loss, rel=1e-5)
    for a, b in zip(single.trace, two["trace"], strict=True):
        assert b["val_ppl"] == pytest.approx(a["val_ppl"], rel=1e-5)
    w1 = load_file(str(tmp_path / "one" / "checkpoint" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "checkpoint" / "model.safetensors"))
    for name, value in w1.items():
        torch.testing.assert_close(w2[name], value, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_torchrun_cli_two_processes(tmp_path: Path) -> None:
    """The same ``lmshrink train`` command under ``torchrun --nproc_per_node 2`` (gloo on CPU)."""
    import os
    import random
    import subprocess
    import sys

    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "."]
    (tmp_path / "c.txt").write_text(
        "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(300))
    )
    bin_dir = Path(sys.executable).parent
    cmd = [
        str(bin_dir / "torchrun"),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(29500 + os.getpid() % 1000),
        str(bin_dir / "lmshrink"),
        "train",
        "--data",
        str(tmp_path / "c.txt"),
        "--val",
        "none",
        "--hidden",
        "32",
        "--layers",
        "1",
        "--heads",
        "2",
        "--vocab-size",
        "300",
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--out",
        str(tmp_path / "out"),
    ]
    subprocess.run(cmd, check=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["world_size"] == 2 and result["steps"] == 3
