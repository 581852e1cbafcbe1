"""``lmshrink prune MODEL --method ... --sparsity S [--nm 2:4] [--calib c4] [--reconstruct] --out DIR``: prune a
model and save it.

Unstructured results are saved sparse (bitmask + non-zero values), structured results as a smaller dense model
with per-block shapes; ``prune_report.json`` beside the weights records per-layer sparsity and importance.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from lmshrink.cli.app import app, console
from lmshrink.errors import LmshrinkError


def _calibration(tokenizer: Any, name: str, n_samples: int, seq_len: int, seed: int) -> list[dict[str, Any]]:
    from lmshrink.data import calibration_batches

    if tokenizer is None:
        raise LmshrinkError("calibration needs a tokenizer, and this model has none; use --method magnitude")
    return list(calibration_batches(tokenizer, name=name, n_samples=n_samples, seq_len=seq_len, seed=seed))


@app.command("prune")
def prune(
    model: str = typer.Argument(..., help="model spec: reference name, local HF dir, .gguf, lmshrink dir"),
    out: Path = typer.Option(..., "--out", help="output directory (written atomically)"),
    method: str = typer.Option(
        ..., "--method", help="magnitude | wanda | sparsegpt | nm | heads | neurons | layers"
    ),
    sparsity: float | None = typer.Option(
        None,
        "--sparsity",
        help="fraction in [0, 1) of weights (unstructured) or heads/neurons/layers removed",
    ),
    nm: str | None = typer.Option(
        None, "--nm", help="N:M pattern such as 2:4 (method nm, or with wanda/sparsegpt)"
    ),
    nm_score: str = typer.Option(
        "wanda", "--nm-score", help="nm method scores: magnitude | wanda | sparsegpt"
    ),
    scope: str = typer.Option("layer", help="magnitude: layer | row | global"),
    reconstruct: bool = typer.Option(
        False,
        "--reconstruct/--no-reconstruct",
        help="heads/neurons: re-fit o_proj/down_proj by least squares on calibration activations after removal",
    ),
    layer_importance: str = typer.Option(
        "influence", "--layer-importance", help="layers: influence (1 - cos) | loss (measured loss increase)"
    ),
    calib: str = typer.Option("c4", "--calib", help="calibration corpus"),
    n_samples: int = typer.Option(64, "--n-samples", help="calibration samples"),
    seq_len: int = typer.Option(512, "--seq-len", help="tokens per calibration sample"),
    seed: int = typer.Option(0, help="calibration sampling seed"),
    dtype: str = typer.Option("float32", help="dtype to load and prune in"),
) -> None:
    """Prune MODEL and save it; prints a summary table."""
    from lmshrink.models import load_model, save_model
    from lmshrink.pruning.api import prune_model
    from lmshrink.pruning.config import make_config
    from lmshrink.utils.io import atomic_write_text, directory_size

    options: dict[str, Any] = {
        "method": method,
        "sparsity": sparsity,
        "nm": nm,
        "scope": scope,
        "calib": calib,
        "n_samples": n_samples,
        "seq_len": seq_len,
        "seed": seed,
    }
    if method == "nm":
        options["nm_score"] = nm_score
    if reconstruct:
        options["reconstruct"] = True
    if layer_importance != "influence":
        options["layer_importance"] = layer_importance
    config = make_config(**options)  # validate before the (slow) model load
    t0 = time.perf_counter()
    net, tokenizer = load_model(model, dtype=dtype)
    calibration = (
        _calibration(tokenizer, calib, n_samples, seq_len, seed) if config.needs_calibration else None
    )
    report = prune_model(net, config, calibration)
    save_model(net, out, tokenizer)
    atomic_write_text(out / "prune_report.json", report.to_json())
    table = Table(title=f"lmshrink prune: {config.method}" + (f" {config.nm}" if config.nm else ""))
    table.add_column("field")
    table.add_column("value")
    for row in (
        ("sparsity", f"{report.sparsity:.4f}"),
        ("parameters", f"{report.parameters_before:,} -> {report.parameters_after:,}"),
        ("layers recorded", str(len(report.layers))),
        ("storage format", str(getattr(net, "lmshrink_format", "dense"))),
        ("output", str(out)),
        ("size on disk", f"{directory_size(out) / 2**20:.2f} MiB"),
        ("time", f"{time.perf_counter() - t0:.1f} s"),
    ):
        table.add_row(*row)
    console.print(table)
