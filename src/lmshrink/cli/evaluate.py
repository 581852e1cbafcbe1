"""``lmshrink eval`` (perplexity / accuracy, agreement with a reference, speed) and ``lmshrink info``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from lmshrink.cli.app import app, console
from lmshrink.errors import LmshrinkError
from lmshrink.utils.io import atomic_write_json

CLASSIFICATION_DATA = ("sst2",)


def check_output_path(path: Path | None) -> None:
    """Fail before any work if ``path`` cannot be written (a directory, or a non-writable location)."""
    if path is None:
        return
    if path.is_dir():
        raise LmshrinkError(f"--json {path} is a directory; give a file name such as {path / 'result.json'}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise LmshrinkError(f"cannot write --json {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK):
        raise LmshrinkError(f"cannot write --json {path}: no write permission for {parent}")
    if path.exists() and not os.access(path, os.W_OK):
        raise LmshrinkError(f"cannot write --json {path}: the existing file is read-only")


def _load(
    spec: str, device: str | None, dtype: str | None = None, task: str | None = None
) -> tuple[Any, Any]:
    from lmshrink.models import load_model
    from lmshrink.utils.env import resolve_device

    return load_model(spec, device=str(resolve_device(device)), dtype=dtype, task=task)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f"{value:,}"
    return "-" if value is None else str(value)


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:.2f} MiB ({n:,} B)"


def _table(title: str, rows: list[tuple[str, Any]]) -> Table:
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in rows:
        table.add_row(key, value if isinstance(value, str) else _fmt(value))
    return table


@app.command("eval")
def eval_command(
    model: str = typer.Argument(..., help="Model: reference name, local directory, .gguf file or hub id."),
    data: str = typer.Option(
        "wikitext2", help="Corpus name (wikitext2, wikitext103, c4, sst2) or text file."
    ),
    protocol: str = typer.Option(
        "gptq", help="Perplexity protocol: gptq (non-overlapping windows) or stride."
    ),
    ctx: int | None = typer.Option(None, help="Context length (default: min(model maximum, 2048))."),
    stride: int | None = typer.Option(None, help="Stride of the sliding-window protocol (default ctx/2)."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", help="Evaluate only the first N tokens."),
    word_level: bool = typer.Option(False, "--word-level", help="Report word-level perplexity."),
    reference: str | None = typer.Option(None, help="Reference model: also report KL and top-1 agreement."),
    speed: bool = typer.Option(False, "--speed", help="Also measure latency, throughput and memory."),
    speed_batch: list[int] = typer.Option(
        [1, 8], "--speed-batch", help="Batch size(s) for --speed (repeatable)."
    ),
    speed_seq_len: list[int] = typer.Option([128], "--speed-seq-len", help="Sequence length(s) for --speed."),
    decode_tokens: int = typer.Option(
        32, "--decode-tokens", help="Tokens generated per decode run (--speed)."
    ),
    batch_size: int | None = typer.Option(
        None,
        "--batch-size",
        help="Windows (default 1) or classification examples (default 32) per forward pass.",
    ),
    limit: int | None = typer.Option(None, help="Use at most N examples (classification data)."),
    device: str | None = typer.Option(None, help="cpu, cuda, cuda:N or auto (default: cuda when present)."),
    dtype: str | None = typer.Option(
        None, help="Load weights as float32, float16 or bfloat16 (default: stored)."
    ),
    json_path: Path | None = typer.Option(None, "--json", help="Write all results to this JSON file."),
) -> None:
    """Evaluate a model: perplexity (causal LMs) or accuracy (classifiers), optionally agreement and speed."""
    from lmshrink import evaluation

    check_output_path(json_path)
    if protocol not in evaluation.PROTOCOLS:
        raise LmshrinkError(
            f"unknown perplexity protocol {protocol!r}; choose one of {', '.join(evaluation.PROTOCOLS)}"
        )
    if stride is not None and protocol != "stride":
        raise LmshrinkError("--stride only applies to --protocol stride; gptq uses non-overlapping windows")
    classify = data in CLASSIFICATION_DATA
    net, tokenizer = _load(model, device, dtype, "sequence-classification" if classify else None)
    results: dict[str, Any] = {}
    rows: list[tuple[str, Any]] = []
    if classify:
        from lmshrink.data import load_sst2

        acc = evaluation.evaluate_accuracy(
            net,
            tokenizer,
            load_sst2(split="dev", limit=limit),
            batch_size=batch_size or 32,
            data=data,
            name=model,
        )
        results["accuracy"] = acc.to_dict()
        rows += [("accuracy", acc.accuracy), ("examples", acc.n_examples)]
    else:
        ppl = evaluation.evaluate_perplexity(
            net,
            tokenizer,
            data,
            protocol=protocol,
            ctx=ctx,
            stride=stride,
            max_tokens=max_tokens,
            word_level=word_level,
            batch_size=batch_size or 1,
            name=model,
        )
        results["perplexity"] = ppl.to_dict()
        p = ppl.protocol
        rows += [
            ("data", ppl.data),
            ("protocol", f"{p['name']}, ctx {p['ctx']}, stride {p['stride']}, {p['level']}-level"),
            ("perplexity", ppl.perplexity),
            ("token perplexity", ppl.token_perplexity),
            ("scored tokens", f"{ppl.n_tokens:,} in {ppl.n_windows} windows"),
            ("dropped tail tokens", p["dropped_tail_tokens"]),
            ("next-token accuracy", ppl.next_token_accuracy),
        ]
        if reference is not None:
            ref, _ = _load(reference, device, dtype)
            agr = evaluation.evaluate_agreement(
                net, ref, tokenizer, data, protocol=protocol, ctx=ctx, stride=stride, max_tokens=max_tokens,
                batch_size=batch_size or 1, name=model,
            )  # fmt: skip
            results["agreement"] = agr.to_dict()
            rows += [
                ("reference", reference),
                ("reference perplexity", agr.reference_perplexity),
                ("KL(reference || model)", agr.kl_mean),
                ("top-1 agreement", agr.top1_agreement),
            ]
    if speed:
        sp = evaluation.measure_speed(
            net, batch_sizes=speed_batch, seq_lens=speed_seq_len, decode_tokens=decode_tokens, name=model
        )
        results["speed"] = sp.to_dict()
        for pt in sp.prefill:
            rows.append(
                (
                    f"prefill b={pt.batch_size} s={pt.seq_len}",
                    f"{pt.median_ms:.2f} ms, {pt.tokens_per_s:,.0f} tok/s",
                )
            )
        for pt in sp.decode:
            rows.append(
                (f"decode b={pt.batch_size}", f"{pt.median_ms:.2f} ms/token, {pt.tokens_per_s:,.1f} tok/s")
            )
        rows.append(("peak memory", _bytes(sp.peak_memory_bytes)))
        rows.append(("threads", sp.threads))
    console.print(_table(f"lmshrink eval {model}", rows))
    if json_path is not None:
        atomic_write_json(json_path, results)
        console.print(f"results written to {json_path}", markup=False)


def model_info(net: Any, spec: str) -> dict[str, Any]:
    """Architecture, parameters, dtype, format, size on disk and compute path of a loaded model."""
    from lmshrink import evaluation
    from lmshrink.evaluation.perplexity import model_dtype, model_max_length
    from lmshrink.kernels.cpu import int8_kernel_note

    config = getattr(net, "config", None)
    path = Path(spec)
    size = evaluation.measure_size(net, path if path.exists() else None, name=spec)
    kernels = evaluation.describe_kernels(net)
    if kernels["kernels"]:
        compute = "real kernel: " + ", ".join(f"{k} ({n} modules)" for k, n in kernels["kernels"].items())
        if kernels["dequantize_on_the_fly"]:
            compute += f"; dequantize on the fly ({kernels['dequantize_on_the_fly']} modules)"
        note = int8_kernel_note(kernels["kernels"])
        if note:
            compute += f"; {note}"
    elif kernels["dequantize_on_the_fly"]:
        compute = f"dequantize on the fly ({kernels['dequantize_on_the_fly']} modules)"
    else:
        compute = "dense float matmuls"
    from lmshrink.quantization.rotation import HadamardInput, is_rotated

    if is_rotated(net):
        compute += "; residual stream rotated (two extra hidden x hidden products per token)"
    hadamards = [m for m in net.modules() if isinstance(m, HadamardInput)]
    if hadamards:
        blocks = sorted({m.block for m in hadamards})
        compute += (
            f"; online block Hadamard on {len(hadamards)} layer inputs"
            f" (blocks of {', '.join(map(str, blocks))}, one extra small matmul pair per call)"
        )
    return {
        "model": spec,
        "architecture": type(net).__name__,
        "parameters": size.parameters,
        "layers": getattr(config, "num_hidden_layers", None),
        "hidden": getattr(config, "hidden_size", None),
        "heads": getattr(config, "num_attention_heads", None),
        "kv_heads": getattr(config, "num_key_value_heads", None),
        "vocab": getattr(config, "vocab_size", None),
        "max_context": model_max_length(net),
        "dtype": str(model_dtype(net)).replace("torch.", ""),
        "format": size.format,
        "compute": compute,
        "bytes_on_disk": size.bytes_on_disk,
        "size_source": "files of " + spec if path.exists() else "as saved by lmshrink.models.save_model",
        "stored_bytes": size.stored_bytes,
        "bits_per_weight": size.bits_per_weight,
    }


@app.command("info")
def info_command(
    model: str = typer.Argument(..., help="Model: reference name, local directory, .gguf file or hub id."),
    device: str | None = typer.Option("cpu", help="Device to load the model on."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the description to this JSON file."),
) -> None:
    """Describe a model: parameters, layers, hidden size, heads, dtype, size on disk, format and compute path."""
    check_output_path(json_path)
    net, _ = _load(model, device)
    info = model_info(net, model)
    rows = [(k, _bytes(v) if k in ("bytes_on_disk", "stored_bytes") else v) for k, v in info.items()]
    console.print(_table(f"lmshrink info {model}", rows))
    if json_path is not None:
        atomic_write_json(json_path, info)
        console.print(f"description written to {json_path}", markup=False)
