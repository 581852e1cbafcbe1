"""Determinism: the same seed and inputs give byte-identical saved models and identical evaluation figures.

Every artifact (dense save, RTN and GPTQ quantization, magnitude and Wanda pruning, each then saved) is produced
twice: once in this process and once in a child of a multiprocessing *forkserver* (a fresh interpreter with its
own hash seed that has imported the libraries and run nothing, so dict/set order, allocator state and library
caches differ; it starts in milliseconds instead of re-importing torch). Every file of each output directory must have the same sha256, except
``lmshrink.json``, which carries its creation time (``created``): it must be identical once that one field is
removed. Evaluation (perplexity on raw text with a tiny model and a tokenizer trained on that text) must give
identical figures, provenance (date, host) aside. Both runs use one CPU thread: determinism is claimed for the same
machine and thread count. A different seed must give different bytes (the comparison is not vacuous).

Run directly (``python tests/test_determinism.py OUT_DIR [SEED]``) to produce one run.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

#: modules the forkserver imports once (the same list as tests/test_kill_resume.py, which may start it first)
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
ARTIFACTS = ("dense", "dense-with-tokenizer", "rtn", "gptq", "magnitude", "wanda")
MANIFEST = "lmshrink.json"
TIMESTAMP_FIELDS = ("created",)
TEXT = (
    "The tiny model reads a short story about a cat. The cat sat on the mat, and the mat was red.\n"
    "Every morning the cat walked to the river, looked at the fish, and walked back home again.\n"
    "Compression makes models smaller; honest measurement shows what the smaller model lost.\n"
) * 12


def _llama(seed: int, vocab: int = 128) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def _calibration(seed: int, n: int = 4, length: int = 32) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 128, (1, length), generator=g)} for _ in range(n)]


def produce(out: Path, seed: int = 0) -> dict[str, Any]:
    """Make every artifact under ``out/<name>`` and write ``out/figures.json``; return the run record
    (``skipped``: artifacts whose API is not available, with the reason)."""
    from lmshrink.models import save_model

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"skipped": {}, "figures": None}

    def step(name: str, make: Any) -> None:
        try:
            make(out / name)
        except (ImportError, AttributeError) as exc:  # API not in this tree yet
            record["skipped"][name] = f"{type(exc).__name__}: {exc}"

    step("dense", lambda d: save_model(_llama(seed), d))

    def with_tokenizer(d: Path) -> None:
        from lmshrink.distillation import train_tokenizer

        tok = train_tokenizer(TEXT, vocab_size=300)
        model = _llama(seed, vocab=len(tok))
        save_model(model, d, tokenizer=tok)
        from lmshrink.evaluation import evaluate_perplexity

        res = evaluate_perplexity(model, tok, TEXT, ctx=64, progress=False)
        record["figures"] = {k: v for k, v in res.to_dict().items() if k != "provenance"}

    step("dense-with-tokenizer", with_tokenizer)

    def quantized(method: str) -> Any:
        def make(d: Path) -> None:
            from lmshrink.quantization import QuantConfig, quantize_model

            cfg = QuantConfig(method=method, format="int4", group_size=32)
            calib = _calibration(seed) if method != "rtn" else None
            save_model(quantize_model(_llama(seed), cfg, calib), d)

        return make

    step("rtn", quantized("rtn"))
    step("gptq", quantized("gptq"))

    def pruned(method: str) -> Any:
        def make(d: Path) -> None:
            from lmshrink.pruning import prune_model

            model = _llama(seed)
            calib = _calibration(seed) if method != "magnitude" else None
            prune_model(model, {"method": method, "sparsity": 0.5}, calib, progress=False)
            save_model(model, d)

        return make

    step("magnitude", pruned("magnitude"))
    step("wanda", pruned("wanda"))
    (out / "record.json").write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
    return record


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder`` (relative path -> hex); the manifest hashed without timestamps."""
    out: dict[str, str] = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = f.relative_to(folder).as_posix()
        data = f.read_bytes()
        if rel == MANIFEST:
            manifest = json.loads(data)
            for key in TIMESTAMP_FIELDS:
                manifest.pop(key, None)
            data = json.dumps(manifest, sort_keys=True).encode()
        out[rel] = hashlib.sha256(data).hexdigest()
    return out


def _split_safetensors(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def unordered_metadata(folder: Path) -> list[str]:
    """safetensors files whose ``__metadata__`` has several keys: safetensors (0.8) writes that map in hash-map
    order, which changes from process to process, so such files cannot be byte-identical across runs."""
    return [
        f.name
        for f in sorted(folder.glob("*.safetensors"))
        if len(_split_safetensors(f)[0].get("__metadata__") or {}) > 1
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any], dict[str, Any]]:
    root = tmp_path_factory.mktemp("determinism")
    a, b = root / "a", root / "b"
    threads = torch.get_num_threads()
    try:
        rec_a = produce(a)
    finally:
        torch.set_num_threads(threads)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    script = str(Path(__file__).resolve())
    code = f"import runpy, sys\nsys.argv = {[script, str(b)]!r}\nrunpy.run_path({script!r}, run_name='__main__')\n"
    proc = ctx.Process(target=exec, args=(code, {}), daemon=True)
    proc.start()
    proc.join(300)
    assert proc.exitcode == 0, f"the second run failed (exit code {proc.exitcode}); see its stderr above"
    rec_b = json.loads((b / "record.json").read_text(encoding="utf-8"))
    return a, b, rec_a, rec_b


@pytest.mark.parametrize("name", ARTIFACTS)
def test_same_seed_gives_byte_identical_files(runs, name: str) -> None:  # type: ignore[no-untyped-def]
    a, b, rec_a, rec_b = runs
    if name in rec_a["skipped"]:
        pytest.skip(f"{name}: API not available: {rec_a['skipped'][name]}")
    assert name not in rec_b["skipped"], rec_b["skipped"]
    da, db = digests(a / name), digests(b / name)
    assert MANIFEST in da and any(f.endswith(".safetensors") for f in da)
    assert sorted(da) == sorted(db), "the two runs wrote different file sets"
    unordered = unordered_metadata(a / name)
    if unordered:
        # the tensors and the header (as a mapping) must still be equal; only the byte order of the map may differ
        for f in unordered:
            assert _split_safetensors(a / name / f) == _split_safetensors(b / name / f), f
        pytest.xfail(
            f"{name}: {unordered} carry several safetensors metadata keys, written in per-process hash order, "
            "so the bytes differ between runs in about half of them (tensors equal); write one metadata key"
        )
    differing = [f for f in da if da[f] != db[f]]
    assert not differing, f"{name}: files differ between two runs with the same seed: {differing}"
    # the manifest differs only in its creation time
    ma = json.loads((a / name / MANIFEST).read_text())
    mb = json.loads((b / name / MANIFEST).read_text())
    assert {k for k in ma if ma[k] != mb.get(k)} <= set(TIMESTAMP_FIELDS)


def test_evaluation_figures_identical(runs) -> None:  # type: ignore[no-untyped-def]
    _, _, rec_a, rec_b = runs
    if rec_a["figures"] is None:
        pytest.skip(f"evaluation not available: {rec_a['skipped']}")
    fa, fb = rec_a["figures"], rec_b["figures"]
    assert fa["n_tokens"] > 100 and fa["n_windows"] >= 2
    assert json.dumps(fa, sort_keys=True) == json.dumps(fb, sort_keys=True)


def test_other_seed_gives_other_bytes(runs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from lmshrink.models import save_model

    a, *_ = runs
    save_model(_llama(seed=1), tmp_path / "dense")
    da, dc = digests(a / "dense"), digests(tmp_path / "dense")
    assert da[MANIFEST] == dc[MANIFEST]  # same architecture, same manifest
    assert da["model.safetensors"] != dc["model.safetensors"]


if __name__ == "__main__":
    produce(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 0)
