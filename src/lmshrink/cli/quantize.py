"""``lmshrink quantize MODEL --method ... --format ... --out DIR``: quantize a model and save it (packed)."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from lmshrink.cli.app import app, console
from lmshrink.errors import LmshrinkError


def _load(spec: str) -> tuple[Any, Any]:
    from lmshrink.models import load_model

    return load_model(spec, dtype="float32")


def _calibration(tokenizer: Any, name: str, n_samples: int, seq_len: int, seed: int) -> list[dict[str, Any]]:
    from lmshrink.data import calibration_batches

    if tokenizer is None:
        raise LmshrinkError("calibration needs a tokenizer, and this model has none")
    return list(calibration_batches(tokenizer, name=name, n_samples=n_samples, seq_len=seq_len, seed=seed))


def _float(text: str, option: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise LmshrinkError(f"{option} must be a number or 'auto', got {text!r}") from None


def _rotation_note(cfg: Any) -> str:
    note = f"residual stream, randomized Hadamard (seed {cfg.rotation_seed})"
    return note + (" + online Hadamard on down_proj inputs" if cfg.online_hadamard else "")


def _summary(model: Any, cfg: Any, out: Path, seconds: float) -> Table:
    from lmshrink.kernels.cpu import int8_kernel_note
    from lmshrink.quantization.linear import QuantLinear
    from lmshrink.utils.io import directory_size

    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    kernels = Counter(m.kernel_name for m in layers)
    n_weights = sum(m.in_features * m.out_features for m in layers)
    bits = sum(m.storage_bits() for m in layers) / max(n_weights, 1)
    table = Table(title=f"lmshrink quantize: {cfg.method} / {cfg.format}")
    table.add_column("field")
    table.add_column("value")
    rows = [
        ("quantized layers", str(len(layers))),
        ("group size", str(cfg.group_size or "per-channel")),
        ("activations", cfg.act_mode),
        *([("rotation", _rotation_note(cfg))] if cfg.rotate else []),
        ("bits per quantized weight (incl. scales)", f"{bits:.3f}"),
        ("kernels (CPU)", ", ".join(f"{k} x{v}" for k, v in kernels.items())),
        ("output", str(out)),
        ("size on disk", f"{directory_size(out) / 2**20:.2f} MiB"),
        ("time", f"{seconds:.1f} s"),
    ]
    if any(k == "dequantize-on-the-fly" for k in kernels):
        rows.append(("speed", "dequantize on the fly: no low-precision kernel, no speed claim"))
    note = int8_kernel_note(kernels)
    if note:
        rows.append(("int8 kernel", note))
    for r in rows:
        table.add_row(*r)
    return table


@app.command("quantize")
def quantize(
    model: str = typer.Argument(..., help="model spec: reference name, local HF dir, .gguf, lmshrink dir"),
    out: Path = typer.Option(..., "--out", help="output directory (written atomically)"),
    method: str = typer.Option("rtn", help="rtn | gptq | awq | smoothquant | llm-int8"),
    format: str = typer.Option("int8", "--format", help="int8, int4, int4-asym, int3, int2, nf4, fp8, ..."),
    group_size: int | None = typer.Option(
        None, "--group-size", help="input columns per scale (default per channel)"
    ),
    calib: str = typer.Option("c4", "--calib", help="calibration corpus for gptq/awq/smoothquant"),
    n_samples: int = typer.Option(128, "--n-samples", help="calibration samples"),
    seq_len: int = typer.Option(512, "--seq-len", help="tokens per calibration sample"),
    seed: int = typer.Option(0, help="calibration sampling seed"),
    act_order: bool = typer.Option(
        True, "--act-order/--no-act-order", help="GPTQ: quantize columns by decreasing Hessian diag"
    ),
    true_sequential: bool = typer.Option(
        True,
        "--true-sequential/--no-true-sequential",
        help="GPTQ: layers of a block one group at a time, each on the inputs of the already quantized ones",
    ),
    scale_refit: int = typer.Option(
        2, "--scale-refit", help="GPTQ: rounds of least-squares group-scale refits"
    ),
    clip_search: bool = typer.Option(
        False,
        "--clip-search/--no-clip-search",
        help="RTN/GPTQ/AWQ integer grids: search each group's clipping range instead of min/max",
    ),
    alpha: str = typer.Option("auto", help="SmoothQuant migration strength in [0, 1], or 'auto' (searched)"),
    threshold: float = typer.Option(6.0, help="LLM.int8() outlier threshold"),
    activations: str = typer.Option("auto", help="auto | int8 | float"),
    outliers: str = typer.Option(
        "auto", help="SmoothQuant: auto (layers keep fp32 outlier columns where that halves the error) | none"
    ),
    float_activations: list[str] | None = typer.Option(
        None,
        "--float-activations",
        help="SmoothQuant: regex of layers that keep float activations (int8 weight-only); repeatable, "
        "e.g. --float-activations down_proj",
    ),
    weight_method: str = typer.Option(
        "rtn",
        "--weight-method",
        help="SmoothQuant: rtn | gptq (GPTQ-rounded smoothed weights; uses the GPTQ options)",
    ),
    damp: float = typer.Option(0.01, help="GPTQ: Hessian damping, a fraction of its mean diagonal"),
    target: list[str] | None = typer.Option(
        None, "--target", help="regex of linear layers to quantize (re.search on the module name); repeatable"
    ),
    skip: list[str] | None = typer.Option(
        None,
        "--skip",
        help="regex of linear layers to leave in float; repeatable; replaces the default "
        "(embeddings, lm_head, classifier and pooler heads)",
    ),
    rotate: bool = typer.Option(
        False,
        "--rotate/--no-rotate",
        help="rotate the residual stream by a random orthogonal matrix first (QuaRot): fewer activation "
        "outliers; Llama-family models",
    ),
    rotation_seed: int = typer.Option(0, "--rotation-seed", help="seed of the --rotate matrix"),
    online_hadamard: bool = typer.Option(
        True,
        "--online-hadamard/--no-online-hadamard",
        help="with --rotate: also an online block-Hadamard on each down_proj input (QuaRot's R4)",
    ),
    embeddings: bool = typer.Option(
        False,
        "--embeddings/--no-embeddings",
        help="also store the embedding tables packed (RTN, same format; a tied LM head shares them)",
    ),
) -> None:
    """Quantize MODEL and save it with packed weights; prints a summary table."""
    from lmshrink.quantization.api import quantize_model
    from lmshrink.quantization.config import QuantConfig
    from lmshrink.quantization.storage import save_quantized_model

    cfg = QuantConfig(
        method=method, format=format, group_size=group_size, act_order=act_order, true_sequential=true_sequential,
        scale_refit=scale_refit, clip_search=clip_search, alpha=alpha if alpha == "auto" else _float(alpha, "--alpha"),
        threshold=threshold, activations=activations, outliers=outliers, damp=damp,
        float_activations=float_activations or [], weight_method=weight_method, rotate=rotate,
        rotation_seed=rotation_seed, online_hadamard=online_hadamard,
        **({"targets": target} if target else {}), **({"skip": skip} if skip is not None else {}),
        calibration={"dataset": calib, "n_samples": n_samples, "seq_len": seq_len, "seed": seed},
    )  # fmt: skip
    t0 = time.perf_counter()
    net, tokenizer = _load(model)
    batches = _calibration(tokenizer, calib, n_samples, seq_len, seed) if cfg.needs_calibration else None
    quantize_model(net, cfg, batches, embeddings=embeddings)
    saved = save_quantized_model(net, out, tokenizer)
    console.print(_summary(net, cfg, saved, time.perf_counter() - t0))
