"""The pipeline runner: skip by fingerprint, resume after an interruption, clean errors, no corrupted run dir."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest

from lmshrink.errors import LmshrinkError
from lmshrink.pipeline import StageContext, register_stage, run_pipeline
from lmshrink.recipes import StageConfig, load_recipe_text, register_stage_config

CALLS: list[str] = []


@register_stage_config
class ToyStage(StageConfig):
    kind: ClassVar[str] = "toy"
    references: ClassVar[dict[str, str]] = {"input": "model"}
    type: Literal["toy"] = "toy"
    input: str | None = None
    value: int = 1
    steps: int = 3
    crash_at: int | None = None


class Crash(KeyboardInterrupt):
    pass


@register_stage("toy")
def _run_toy(ctx: StageContext, cfg: ToyStage) -> dict[str, Any]:
    """Counts 'training steps' with a checkpoint in the work dir; can crash mid-way like a killed process."""
    CALLS.append(cfg.name)
    base = 0
    if cfg.input:
        base = int((ctx.model_dir(cfg.input) / "weights.txt").read_text())
    ckpt = ctx.work_dir / "step.txt"
    start = int(ckpt.read_text()) if ckpt.exists() else 0
    (ctx.out_dir / "model").mkdir()
    (ctx.out_dir / "model" / "partial.txt").write_text("half")
    for step in range(start, cfg.steps):
        if cfg.crash_at is not None and step == cfg.crash_at and not os.environ.get("TOY_NO_CRASH"):
            raise Crash
        ckpt.write_text(str(step + 1))
    (ctx.out_dir / "model" / "weights.txt").write_text(str(base + cfg.value))
    return {"model": {"parameters": base + cfg.value}, "resumed_from": start}


def _recipe(a: int = 1, b: int = 10, crash: str = "") -> Any:
    return load_recipe_text(
        f"name: toy\nstages:\n  - {{name: a, type: toy, value: {a}}}\n"
        f"  - {{name: b, type: toy, input: a, value: {b}{crash}}}\n  - {{name: c, type: toy, value: 5}}\n"
    )


def test_rerun_skips_unchanged_and_reruns_downstream(tmp_path: Path) -> None:
    CALLS.clear()
    res = run_pipeline(_recipe(), tmp_path / "run", report=False)
    assert res.ran() == ["a", "b", "c"]
    assert (tmp_path / "run/stages/b/model/weights.txt").read_text() == "11"
    res = run_pipeline(_recipe(), tmp_path / "run", report=False)
    assert res.skipped() == ["a", "b", "c"] and CALLS == ["a", "b", "c"]
    # changing a changes a and b (downstream), not c
    res = run_pipeline(_recipe(a=2), tmp_path / "run", report=False)
    assert res.ran() == ["a", "b"] and res.skipped() == ["c"]
    assert (tmp_path / "run/stages/b/model/weights.txt").read_text() == "12"
    # results.json and stage.json are complete JSON with provenance and the fingerprint chain
    results = json.loads((tmp_path / "run/stages/b/results.json").read_text())
    stage = json.loads((tmp_path / "run/stages/b/stage.json").read_text())
    assert results["stage"] == "b" and "provenance" in results
    assert (
        stage["inputs"]["a"] == json.loads((tmp_path / "run/stages/a/stage.json").read_text())["fingerprint"]
    )
    res = run_pipeline(_recipe(a=2), tmp_path / "run", report=False, force={"c"})
    assert res.ran() == ["c"]


def test_interrupted_stage_leaves_no_partial_output_and_resumes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_pipeline(_recipe(), run, report=False)
    with pytest.raises(Crash):
        run_pipeline(_recipe(b=20, crash=", crash_at: 2"), run, report=False)
    # the old, complete b is still in place (the new one never replaced it), nothing half-written is visible
    assert (run / "stages/b/model/weights.txt").read_text() == "11"
    assert not list((run / "stages").glob(".*"))
    status = json.loads((run / "run.json").read_text())
    assert status["stages"]["b"]["status"] == "interrupted"
    # a kill -9 leaves a temporary directory behind: the next run removes it
    (run / "stages" / ".b.xyz.tmp").mkdir()
    os.environ["TOY_NO_CRASH"] = "1"
    try:
        CALLS.clear()
        res = run_pipeline(_recipe(b=20, crash=", crash_at: 2"), run, report=False)
    finally:
        del os.environ["TOY_NO_CRASH"]
    assert res.ran() == ["b"] and res.skipped() == ["a", "c"]
    assert not (run / "stages" / ".b.xyz.tmp").exists()
    results = json.loads((run / "stages/b/results.json").read_text())
    assert results["resumed_from"] == 2  # training resumed from its checkpoint, not from scratch
    assert (run / "stages/b/model/weights.txt").read_text() == "21"
    assert not (run / "work").exists()


def test_unwritable_run_dir_is_a_clear_error(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(LmshrinkError, match="cannot create run directory"):
        run_pipeline(_recipe(), f, report=False)
    with pytest.raises(LmshrinkError, match="cannot create run directory"):
        run_pipeline(_recipe(), f / "sub", report=False)
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(LmshrinkError, match=r"cannot create run directory .*writable --run-dir"):
            run_pipeline(_recipe(), ro / "run", report=False)
    finally:
        ro.chmod(0o700)


def test_locked_run_dir_is_refused(tmp_path: Path) -> None:
    import fcntl

    from lmshrink.pipeline import RunDirectory

    RunDirectory(tmp_path / "run").prepare()
    fd = os.open(tmp_path / "run" / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another open file description: conflicts like another process would
    try:
        with pytest.raises(LmshrinkError, match="is in use by"):
            run_pipeline(_recipe(), tmp_path / "run", report=False)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------ real stages, tiny model
def _save_tiny(tiny_llama: Any, path: Path) -> Path:
    from transformers import PreTrainedTokenizerFast

    from lmshrink.distillation import train_tokenizer
    from lmshrink.models import save_model

    tok: PreTrainedTokenizerFast = train_tokenizer(
        "the cat sat on the mat. " * 40 + "a dog ran far away. " * 40, 300
    )
    tiny_llama.resize_token_embeddings(len(tok))
    return save_model(tiny_llama, path, tok)


def test_real_stages_prune_quantize_plan_evaluate_report(
    tiny_llama: Any, tmp_path: Path, data_dir: Path
) -> None:
    model_dir = _save_tiny(tiny_llama, tmp_path / "tiny")
    text = f"""\
name: real
stages:
  - {{name: teacher, model: {model_dir}}}
  - {{name: pruned, type: prune, input: teacher, method: magnitude, sparsity: 0.5}}
  - {{name: int4, type: quantize, input: pruned, format: int4, group_size: 32}}
  - name: sens
    type: sensitivity
    input: teacher
    choices: [2, 4, 8]
    target: 4
    n_windows: 2
    seq_len: 16
  - {{name: mixed, type: quantize, input: teacher, plan: sens}}
  - name: eval
    type: evaluate
    perplexity: {{data: wikitext2, ctx: 64, max_tokens: 256}}
    speed: {{batch_sizes: [1, 2], seq_len: 16, decode_tokens: 2, repeats: 1, warmup: 0}}
"""
    res = run_pipeline(load_recipe_text(text), tmp_path / "run")
    assert res.ran() == ["teacher", "pruned", "int4", "sens", "mixed", "eval"]
    run = tmp_path / "run"
    pruned = json.loads((run / "stages/pruned/results.json").read_text())
    assert all(abs(s - 0.5) < 0.01 for s in pruned["layer_sparsity"].values())
    plan = json.loads((run / "stages/sens/sensitivity.json").read_text())["plan"]
    assert plan["average"] <= 4.0 + 1e-6
    mixed = json.loads((run / "stages/mixed/results.json").read_text())
    assert mixed["model"]["format"] == "quantized" and mixed["plan"]["average_bits"] == plan["average"]
    ev = json.loads((run / "stages/eval/results.json").read_text())
    teacher, int4 = ev["models"]["teacher"], ev["models"]["int4"]
    assert int4["bytes_on_disk"] < teacher["bytes_on_disk"]
    assert 1 < teacher["perplexity"] < 1e4 and 0 <= int4["next_token_accuracy"] <= 1
    assert set(teacher["speed"]) == {"1", "2"}
    md = (run / "report.md").read_text()
    assert "| int4 | quantize | quantized |" in md and "figures/pareto.png" in md
    # a rerun only rebuilds the report; a changed quantize stage reruns it and the evaluation (from cache for others)
    res = run_pipeline(load_recipe_text(text), run)
    assert res.ran() == []
    res = run_pipeline(load_recipe_text(text.replace("group_size: 32", "group_size: 16")), run)
    assert res.ran() == ["int4", "eval"]
