"""The report's figures, drawn with matplotlib's Agg backend into PNG bytes; each states protocol and machine."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from lmshrink.report.collect import ModelRow, RunData


def protocol_text(run: RunData) -> str:
    """One line naming the measurement protocol and the machine."""
    ppl = run.protocol.get("perplexity") or {}
    parts = []
    if ppl:
        tokens = f", first {ppl['max_tokens']} tokens" if ppl.get("max_tokens") else ""
        ctx = f", ctx {ppl['ctx']}" if ppl.get("ctx") else ""
        parts.append(
            f"perplexity: {ppl.get('data', '?')} test, {ppl.get('protocol', 'gptq')} protocol{ctx}{tokens}"
        )
    speed = run.protocol.get("speed") or {}
    if speed:
        parts.append(f"speed: prefill seq {speed.get('seq_len')}, median of {speed.get('repeats')}")
    acc = run.protocol.get("accuracy") or {}
    if acc:
        parts.append(f"accuracy: {acc.get('data')} {acc.get('split')}")
    load = (
        f" (1-min load average {run.load_average:g} during evaluation)"
        if run.load_average is not None
        else ""
    )
    parts.append(f"machine: {run.machine or 'unknown'}{load}")
    if run.date:
        parts.append(run.date)
    return "; ".join(parts)


def _png(fig: Figure, caption: str) -> bytes:
    fig.text(0.01, 0.005, caption, fontsize=6.5, color="#555555", ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _pareto_front(points: Sequence[tuple[float, float]], lower_is_better: bool) -> list[tuple[float, float]]:
    front: list[tuple[float, float]] = []
    best = float("inf") if lower_is_better else -float("inf")
    for x, y in sorted(points):
        if (y < best) if lower_is_better else (y > best):
            front.append((x, y))
            best = y
    return front


def pareto_figure(rows: Sequence[ModelRow], caption: str, by_run: bool = False) -> bytes | None:
    """Size on disk vs perplexity (or accuracy) for every model; the Pareto front is drawn as a line."""
    use_ppl = any(r.perplexity is not None for r in rows)
    metric = "perplexity" if use_ppl else "accuracy"
    pts = [(r, getattr(r, metric)) for r in rows if r.bytes_on_disk and getattr(r, metric) is not None]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.6))
    runs = sorted({r.run for r, _ in pts})
    for i, (row, value) in enumerate(pts):
        color = f"C{runs.index(row.run) % 10}" if by_run else f"C{i % 10}"
        size_mb = (row.bytes_on_disk or 0) / 1e6
        ax.scatter([size_mb], [value], color=color, s=40, zorder=3)
        label = f"{row.run}/{row.name}" if by_run else row.name
        ax.annotate(label, (size_mb, value), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = _pareto_front([((r.bytes_on_disk or 0) / 1e6, float(v)) for r, v in pts], lower_is_better=use_ppl)
    if len(front) > 1:
        ax.plot(*zip(*front, strict=True), color="#888888", lw=1, ls="--", label="Pareto front", zorder=2)
        ax.legend(fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("size on disk (MB, log scale)")
    ax.set_ylabel(metric + (" (lower is better)" if use_ppl else " (higher is better)"))
    ax.set_title(f"Size vs {metric}")
    ax.grid(alpha=0.3, which="both")
    return _png(fig, caption)


def speed_figure(rows: Sequence[ModelRow], caption: str) -> bytes | None:
    """Prefill latency and throughput per batch size, one line per model."""
    rows = [r for r in rows if r.speed]
    if not rows:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.8))
    for i, r in enumerate(rows):
        sizes = sorted(r.speed, key=int)
        xs = [int(s) for s in sizes]
        ax1.plot(
            xs, [r.speed[s].get("latency_ms", float("nan")) for s in sizes], "o-", color=f"C{i}", label=r.name
        )
        ax2.plot(
            xs,
            [r.speed[s].get("tokens_per_s", float("nan")) for s in sizes],
            "o-",
            color=f"C{i}",
            label=r.name,
        )
    for ax, ylabel in ((ax1, "prefill latency (ms, median)"), (ax2, "throughput (tokens/s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax1.set_title("Latency per batch size")
    ax2.set_title("Throughput per batch size")
    ax2.legend(fontsize=7)
    return _png(fig, caption)


def training_figure(traces: dict[str, list[dict[str, Any]]], caption: str) -> bytes | None:
    """Loss and accuracy per epoch (as the source's training trace), one line per training stage."""
    if not traces:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.8))
    for i, (name, trace) in enumerate(traces.items()):
        epochs = [t.get("epoch", j + 1) for j, t in enumerate(trace)]
        ax1.plot(epochs, [t.get("loss", float("nan")) for t in trace], "o-", color=f"C{i}", label=name)
        if any(t.get("accuracy") is not None for t in trace):
            acc = [t.get("accuracy") if t.get("accuracy") is not None else float("nan") for t in trace]
            ax2.plot(epochs, acc, "o-", color=f"C{i}", label=name)
        if any(t.get("val_accuracy") is not None for t in trace):
            val = [
                t.get("val_accuracy") if t.get("val_accuracy") is not None else float("nan") for t in trace
            ]
            ax2.plot(epochs, val, "s--", color=f"C{i}", label=f"{name} (validation)")
    ax1.set_title("Training loss per epoch")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax2.set_title("Accuracy per epoch")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("next-token / label accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _png(fig, caption)


def sensitivity_figure(name: str, doc: dict[str, Any], caption: str) -> bytes | None:
    """Per-layer damage at each choice (log scale) and the chosen plan."""
    sens = doc.get("sensitivity") or {}
    layers = sens.get("layers") or []
    if not layers:
        return None
    plan = (doc.get("plan") or {}).get("layers", {})
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 5.5), sharex=True)
    xs = list(range(len(layers)))
    unit = "bits" if sens.get("mode") == "quantize" else "sparsity"
    for j, c in enumerate(sens.get("choices", [])):
        key = f"{c:g}"
        ax1.plot(
            xs,
            [max(layer["costs"].get(key, 0.0), 1e-9) for layer in layers],
            ".-",
            lw=0.8,
            color=f"C{j}",
            label=f"{unit} {key}",
        )
    ax1.set_yscale("log")
    ax1.set_ylabel("KL vs original (nats)")
    ax1.set_title(f"Per-layer sensitivity ({name}: each layer {sens.get('mode', '?')}d alone)")
    ax1.legend(fontsize=7, ncol=4)
    ax1.grid(alpha=0.3)
    ax2.bar(xs, [plan.get(layer["name"], 0) for layer in layers], color="C0")
    ax2.set_ylabel(f"plan ({unit})")
    ax2.set_xlabel("layer (in model order)")
    ax2.grid(alpha=0.3, axis="y")
    step = max(1, len(layers) // 30)
    ax2.set_xticks(xs[::step])
    ax2.set_xticklabels([layers[i]["name"].split(".", 2)[-1] for i in xs[::step]], rotation=90, fontsize=5)
    return _png(fig, caption)


def sparsity_figure(sparsity: dict[str, dict[str, float]], caption: str) -> bytes | None:
    """Per-layer sparsity of every pruned model."""
    if not sparsity:
        return None
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(sparsity)
    names: list[str] = []
    for i, (stage, layers) in enumerate(sparsity.items()):
        names = list(layers)
        xs = [k + i * width for k in range(len(names))]
        ax.bar(xs, [layers[n] for n in names], width=width, color=f"C{i}", label=stage)
    step = max(1, len(names) // 30)
    ax.set_xticks(list(range(len(names)))[::step])
    ax.set_xticklabels([n.split(".", 2)[-1] for n in names][::step], rotation=90, fontsize=5)
    ax.set_ylabel("fraction of zero weights")
    ax.set_ylim(0, 1)
    ax.set_title("Per-layer sparsity")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    return _png(fig, caption)
