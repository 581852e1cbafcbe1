"""Markdown and self-contained HTML (PNG figures embedded as base64) from collected runs."""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Sequence
from pathlib import Path

from lmshrink.report import figures
from lmshrink.report.collect import ModelRow, RunData, collect_run
from lmshrink.utils.io import atomic_write_bytes, atomic_write_text

COLUMNS = (
    "model",
    "stage",
    "format",
    "parameters",
    "nonzero params",
    "size on disk",
    "bits/weight (disk)",
    "perplexity",
    "next-token acc.",
    "accuracy",
    "latency (ms, bs=min)",
    "throughput (tok/s, bs=max)",
    "compression vs baseline",
)


def _fmt(value: float | int | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def table_rows(rows: Sequence[ModelRow], with_run: bool = False) -> list[list[str]]:
    """The report table as strings, one list per model."""
    out = []
    for r in rows:
        cells = [
            f"{r.run}/{r.name}" if with_run else r.name,
            r.stage_type,
            r.format,
            _fmt(r.parameters, ",d"),
            "-" if r.nonzero_parameters in (None, r.parameters) else format(r.nonzero_parameters, ",d"),
            _size(r.bytes_on_disk),
            _fmt(r.bits_per_weight, ".2f"),
            _fmt(r.perplexity, ".2f"),
            _fmt(r.next_token_accuracy, ".4f"),
            _fmt(r.accuracy, ".4f"),
            _fmt(r.latency_ms, ".1f"),
            _fmt(r.tokens_per_s, ",.0f"),
            "-" if r.compression is None else f"{r.compression:.2f}x",
        ]
        out.append(cells)
    return out


def _drop_empty(header: Sequence[str], rows: list[list[str]]) -> tuple[list[str], list[list[str]]]:
    keep = [i for i in range(len(header)) if i == 0 or any(row[i] != "-" for row in rows)]
    return [header[i] for i in keep], [[row[i] for i in keep] for row in rows]


def markdown_table(rows: Sequence[ModelRow], with_run: bool = False) -> str:
    """A Markdown table of ``rows`` (columns that nobody measured are dropped)."""
    header, body = _drop_empty(COLUMNS, table_rows(rows, with_run))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _html_table(rows: Sequence[ModelRow], with_run: bool = False) -> str:
    header, body = _drop_empty(COLUMNS, table_rows(rows, with_run))
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>"


def _figures(run: RunData) -> list[tuple[str, str, bytes]]:
    caption = figures.protocol_text(run)
    out: list[tuple[str, str, bytes]] = []
    candidates = [
        ("pareto", "Size vs quality (Pareto view)", figures.pareto_figure(run.models, caption)),
        ("speed", "Latency and throughput per batch size", figures.speed_figure(run.models, caption)),
        ("training", "Training curves", figures.training_figure(run.traces(), caption)),
        ("sparsity", "Per-layer sparsity", figures.sparsity_figure(run.sparsity(), caption)),
    ]
    for name, doc in run.sensitivity().items():
        candidates.append(
            (f"sensitivity-{name}", f"Sensitivity ({name})", figures.sensitivity_figure(name, doc, caption))
        )
    for key, title, png in candidates:
        if png is not None:
            out.append((key, title, png))
    return out


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}"
    "td:first-child,th:first-child{text-align:left}th{background:#f2f2f2}img{max-width:100%}"
    ".note{color:#555;font-size:12px}"
)


def _stage_lines(run: RunData) -> list[str]:
    lines = []
    for s in run.stages:
        res = s["results"]
        extra = ""
        if res.get("plan"):
            plan = res["plan"]
            extra = f" - plan average {plan.get('average')} (target {plan.get('target')})"
            measured = plan.get("measured") or {}
            if measured:
                extra += "; measured " + ", ".join(f"{k}: {v}" for k, v in measured.items())
        cpu = res.get("cpu_seconds")
        cpu_text = f" wall, {cpu:.1f} s CPU" if cpu is not None else ""
        lines.append(f"{s['name']} ({s['type']}): {s.get('seconds', 0):.1f} s{cpu_text}{extra}")
    return lines


def build_report(run_dir: str | os.PathLike[str]) -> Path:
    """Write ``report.md``, ``report.html`` (self-contained) and ``figures/*.png`` for a run; return the HTML path.

    >>> build_report("runs/demo")  # doctest: +SKIP
    PosixPath('runs/demo/report.html')
    """
    run = collect_run(run_dir)
    figs = _figures(run)
    fig_dir = run.path / "figures"
    for key, _title, png in figs:
        atomic_write_bytes(fig_dir / f"{key}.png", png)
    caption = figures.protocol_text(run)
    baseline = f"compression ratio = baseline bytes on disk / model bytes on disk; baseline: {run.baseline}"
    md = [
        f"# lmshrink report: {run.name}",
        "",
        f"_{caption}_",
        "",
        markdown_table(run.models),
        "",
        baseline,
        "",
    ]
    md += ["## Stages", ""] + [f"- {line}" for line in _stage_lines(run)] + [""]
    for key, title, _png in figs:
        md += [f"## {title}", "", f"![{title}](figures/{key}.png)", ""]
    atomic_write_text(run.path / "report.md", "\n".join(md))
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>lmshrink report: {html.escape(run.name)}</title>"
        f"<style>{_CSS}</style></head><body><h1>lmshrink report: {html.escape(run.name)}</h1>",
        f"<p class='note'>{html.escape(caption)}</p>",
        _html_table(run.models),
        f"<p class='note'>{html.escape(baseline)}</p><h2>Stages</h2><ul>",
        "".join(f"<li>{html.escape(line)}</li>" for line in _stage_lines(run)),
        "</ul>",
    ]
    for _key, title, png in figs:
        b64 = base64.b64encode(png).decode("ascii")
        parts.append(
            f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{b64}'>"
        )
    parts.append("</body></html>")
    out = run.path / "report.html"
    atomic_write_text(out, "".join(parts))
    return out


def compare_runs(run_dirs: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str]) -> Path:
    """Put several runs side by side: ``compare.md`` and a self-contained ``compare.html`` in ``out_dir``."""
    runs = [collect_run(d) for d in run_dirs]
    rows = [row for run in runs for row in run.models]
    caption = " | ".join(f"{run.name}: {figures.protocol_text(run)}" for run in runs)
    png = figures.pareto_figure(rows, caption, by_run=True)
    out = Path(out_dir)
    md = ["# lmshrink comparison", "", *[f"- {run.name}: {figures.protocol_text(run)}" for run in runs], ""]
    md += [markdown_table(rows, with_run=True), ""]
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>lmshrink comparison</title><style>{_CSS}</style>"
        "</head><body><h1>lmshrink comparison</h1><ul>",
        "".join(
            f"<li>{html.escape(run.name)}: {html.escape(figures.protocol_text(run))}</li>" for run in runs
        ),
        "</ul>",
        _html_table(rows, with_run=True),
    ]
    if png is not None:
        atomic_write_bytes(out / "compare-pareto.png", png)
        md += ["![Size vs quality](compare-pareto.png)", ""]
        parts.append(
            f"<h2>Size vs quality</h2><img src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
        )
    parts.append("</body></html>")
    atomic_write_text(out / "compare.md", "\n".join(md))
    atomic_write_text(out / "compare.html", "".join(parts))
    return out / "compare.html"
