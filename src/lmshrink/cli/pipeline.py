"""``lmshrink run`` (a recipe), ``lmshrink report`` / ``compare`` (run directories) and ``lmshrink sensitivity``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from lmshrink.cli.app import app, console
from lmshrink.errors import LmshrinkError


@app.command("run")
def run_command(
    recipe: Path = typer.Argument(..., help="YAML recipe (see examples/)"),
    run_dir: Path | None = typer.Option(None, "--run-dir", help="run directory (default: runs/RECIPE_NAME)"),
    force: list[str] = typer.Option([], "--force", help="rerun this stage even if unchanged (repeatable)"),
    until: str | None = typer.Option(None, "--until", help="stop after this stage"),
    check: bool = typer.Option(False, "--check", help="validate the recipe and exit"),
    no_report: bool = typer.Option(False, "--no-report", help="do not (re)build report.md / report.html"),
) -> None:
    """Run a compression recipe; unchanged stages are skipped, an interrupted stage is redone or resumed."""
    from lmshrink.pipeline import run_pipeline
    from lmshrink.recipes import StageConfig, load_recipe

    r = load_recipe(recipe)
    if check:
        console.print(
            f"recipe {recipe} is valid: {len(r.stages)} stages ({', '.join(s.name for s in r.stages)})"
        )
        return
    target = run_dir or Path("runs") / r.name
    t0 = time.perf_counter()

    def on_event(event: str, stage: StageConfig, info: dict[str, Any]) -> None:
        if event == "skipped":
            console.print(f"[dim]skip[/]  {escape(stage.name)} ({stage.type}): unchanged")
        elif event == "start":
            console.print(f"[bold]run[/]   {escape(stage.name)} ({stage.type}) ...")
        elif event == "done":
            console.print(f"[green]done[/]  {escape(stage.name)} in {info['seconds']:.1f} s")
        elif event in ("failed", "interrupted"):
            console.print(f"[red]{event}[/] {escape(stage.name)}")

    result = run_pipeline(
        r,
        target,
        base_dir=recipe.parent,
        force=set(force),
        until=until,
        report=not no_report,
        on_event=on_event,
    )
    console.print(f"run directory: {result.run_dir}  ({time.perf_counter() - t0:.1f} s)", markup=False)
    if result.report is not None:
        from lmshrink.report import collect_run, markdown_table

        console.print(markdown_table(collect_run(result.run_dir).models), soft_wrap=True, highlight=False)
        console.print(f"report: {result.report}  and  {result.run_dir / 'report.md'}", markup=False)


@app.command("report")
def report_command(run_dir: Path = typer.Argument(..., help="a run directory")) -> None:
    """Rebuild report.md, report.html and figures/ of a run directory."""
    from lmshrink.report import build_report, collect_run, markdown_table

    out = build_report(run_dir)
    console.print(markdown_table(collect_run(run_dir).models), soft_wrap=True, highlight=False)
    console.print(f"report: {out}", markup=False)


@app.command("compare")
def compare_command(
    run_dirs: list[Path] = typer.Argument(..., help="two or more run directories"),
    out: Path = typer.Option(Path("runs/compare"), "--out", help="where compare.md / compare.html go"),
) -> None:
    """Put several runs side by side (table and Pareto plot)."""
    from lmshrink.report import collect_run, compare_runs, markdown_table

    if len(run_dirs) < 1:
        raise LmshrinkError("give at least one run directory")
    path = compare_runs(run_dirs, out)
    rows = [row for d in run_dirs for row in collect_run(d).models]
    console.print(markdown_table(rows, with_run=True), soft_wrap=True, highlight=False)
    console.print(f"comparison: {path}", markup=False)


@app.command("sensitivity")
def sensitivity_command(
    model: str = typer.Argument(..., help="model spec (reference name, directory, .gguf)"),
    mode: str = typer.Option("quantize", help="quantize | prune"),
    choices: str = typer.Option("2,3,4,8", help="bits (quantize) or sparsities (prune), comma separated"),
    target: float = typer.Option(4.0, help="target average bits (quantize) or sparsity (prune)"),
    group_size: int | None = typer.Option(None, help="quantization group size (default: per channel)"),
    data: str = typer.Option("wikitext103", help="calibration corpus"),
    windows: int = typer.Option(4, help="number of calibration windows"),
    seq_len: int = typer.Option(128, help="tokens per window"),
    targets: str = typer.Option(".*", help="regex of layers to measure"),
    measure: str | None = typer.Option(
        None, help="bits to measure (others estimated by the 4^-bits law); default: every choice"
    ),
    metric: str = typer.Option("kl", help="kl (end-to-end, one forward per layer and bit width) | output"),
    seed: int = typer.Option(0),
    validate: bool = typer.Option(True, help="measure plan vs uniform on held-out windows"),
    out: Path = typer.Option(Path("sensitivity.json"), "--out", help="where the plan is written"),
    device: str | None = typer.Option(None, help="cpu | cuda | auto"),
) -> None:
    """Per-layer damage (KL vs the original) of quantizing or pruning each layer alone, and a per-layer plan."""
    import torch

    from lmshrink.data import calibration_batches
    from lmshrink.models import load_model
    from lmshrink.sensitivity import make_plan, measure_sensitivity, plan_damage, plan_to_json, uniform_plan
    from lmshrink.utils.env import resolve_device
    from lmshrink.utils.io import atomic_write_json

    if metric not in ("kl", "output"):
        raise LmshrinkError(f"--metric must be 'kl' or 'output', got {metric!r}")
    if mode not in ("quantize", "prune"):
        raise LmshrinkError(f"--mode must be 'quantize' or 'prune', got {mode!r}")
    try:
        values = [float(c) for c in choices.split(",") if c.strip()]
    except ValueError as exc:
        raise LmshrinkError(f"--choices must be numbers separated by commas, got {choices!r}") from exc
    dev = str(resolve_device(device))
    m, tok = load_model(model, device=dev)
    t0 = time.perf_counter()
    calib = torch.cat([b["input_ids"] for b in calibration_batches(tok, data, windows, seq_len, seed)])
    sens = measure_sensitivity(
        m,
        calib,
        mode="prune" if mode == "prune" else "quantize",
        choices=values,
        group_size=group_size,
        targets=[targets],
        measure=[float(c) for c in measure.split(",")] if measure else None,
        metric="output" if metric == "output" else "kl",
        progress=True,
    )
    sens.protocol = {"model": model, "data": data, "n_windows": windows, "seq_len": seq_len, "seed": seed}
    plan = make_plan(sens, target)
    console.print(
        f"measured {len(sens.layers)} layers x {len(values)} choices in {time.perf_counter() - t0:.0f} s"
    )
    if validate:
        held = torch.cat([b["input_ids"] for b in calibration_batches(tok, data, windows, seq_len, seed + 1)])
        plan.measured = {"plan": plan_damage(m, plan, held)}
        for c in values:
            if abs(c - target) < 1e-9:
                plan.measured[f"uniform_{c:g}"] = plan_damage(m, uniform_plan(sens, c), held)
        for key, value in plan.measured.items():
            console.print(
                f"{key}: KL {value['kl_mean']:.5f}, perplexity {value['perplexity']:.3f} "
                f"(original {value['reference_perplexity']:.3f})"
            )
    atomic_write_json(out, plan_to_json(sens, plan))
    console.print(
        f"plan: average {plan.average:.3f} (target {target:g}), predicted damage {plan.predicted:.5f}; "
        f"uniform: {', '.join(f'{k}: {v:.5f}' for k, v in plan.uniform.items())}"
    )
    console.print(f"written: {out}", markup=False)
