"""Reports: Markdown table, self-contained HTML with embedded PNGs, comparison of runs."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest

from lmshrink.errors import LmshrinkError
from lmshrink.report import build_report, collect_run, compare_runs

PROV = {"device_name": "Test CPU (2 threads)", "date": "2026-11-23T08:00:00+00:00"}


def _stage(run: Path, name: str, type_: str, results: dict[str, Any]) -> None:
    d = run / "stages" / name
    d.mkdir(parents=True)
    (d / "stage.json").write_text(
        json.dumps({"name": name, "type": type_, "fingerprint": "x", "seconds": 1.5})
    )
    (d / "results.json").write_text(json.dumps({"stage": name, "type": type_, "provenance": PROV, **results}))


def _fake_run(run: Path) -> None:
    trace = [{"epoch": e, "loss": 3.0 / e, "accuracy": 0.2 + 0.05 * e} for e in range(1, 5)]
    _stage(
        run, "teacher", "teacher", {"model": {"parameters": 1000, "bytes_on_disk": 4_000_000}, "trace": trace}
    )
    _stage(
        run,
        "pruned",
        "prune",
        {
            "model": {"parameters": 1000, "bytes_on_disk": 2_500_000},
            "layer_sparsity": {"model.layers.0.mlp.up_proj": 0.5, "model.layers.1.q": 0.4},
        },
    )
    _stage(
        run,
        "int4",
        "quantize",
        {"model": {"parameters": 1000, "bytes_on_disk": 600_000, "format": "quantized"}},
    )
    layers = [
        {
            "name": f"model.layers.{i}.mlp.up_proj",
            "block": i,
            "params": 10,
            "costs": {"2": 0.1 * (i + 1), "4": 0.01 * (i + 1)},
        }
        for i in range(3)
    ]
    _stage(
        run,
        "sens",
        "sensitivity",
        {
            "sensitivity": {"mode": "quantize", "choices": [2, 4], "layers": layers},
            "plan": {
                "layers": {ly["name"]: 4 for ly in layers},
                "average": 4,
                "target": 4,
                "measured": {"plan_kl": 0.01, "uniform_kl": 0.02},
            },
        },
    )
    speed = {
        "1": {"latency_ms": 10.0, "tokens_per_s": 1000.0},
        "8": {"latency_ms": 40.0, "tokens_per_s": 3000.0},
    }
    models = {
        "teacher": {"perplexity": 50.0, "next_token_accuracy": 0.3, "speed": speed},
        "pruned": {"perplexity": 60.0, "next_token_accuracy": 0.28, "speed": speed},
        "int4": {"perplexity": 55.0, "next_token_accuracy": 0.29, "speed": speed},
    }
    protocol = {
        "perplexity": {"data": "wikitext2", "protocol": "gptq", "ctx": 128, "max_tokens": 4096},
        "speed": {"seq_len": 64, "repeats": 3},
    }
    _stage(run, "eval", "evaluate", {"models": models, "baseline": "teacher", "protocol": protocol})


def test_report_has_table_and_embedded_pngs(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _fake_run(run)
    data = collect_run(run)
    int4 = next(r for r in data.models if r.name == "int4")
    assert int4.compression == pytest.approx(4_000_000 / 600_000)
    assert int4.latency_ms == 10.0 and int4.tokens_per_s == 3000.0
    html_path = build_report(run)
    md = (run / "report.md").read_text()
    assert "| model | stage | format | parameters | size on disk |" in md
    assert "| int4 | quantize | quantized | 1,000 | 0.60 MB |" in md and "6.67x" in md
    assert "wikitext2 test, gptq protocol, ctx 128, first 4096 tokens" in md and "Test CPU" in md
    for name in ("pareto", "speed", "training", "sparsity", "sensitivity-sens"):
        png = run / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = html_path.read_text()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", text)
    assert len(images) == 5
    assert all(base64.b64decode(b)[:4] == b"\x89PNG" for b in images)
    assert "src='figures/" not in text and "http" not in text  # self-contained


def test_compare_and_bad_run_dir(tmp_path: Path) -> None:
    for name in ("a", "b"):
        _fake_run(tmp_path / name)
    out = compare_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "cmp")
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| a/int4 |" in md and "| b/teacher |" in md
    assert "data:image/png;base64," in out.read_text()
    with pytest.raises(LmshrinkError, match="not a run directory"):
        collect_run(tmp_path / "nothing")
