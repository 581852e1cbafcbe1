"""The GPU speed script, run end to end on CPU (its smoke mode): every part produces rows, speed-ups are the
baseline's time over the variant's, failures are recorded rather than fatal, and the files are complete JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import quantize_speed_gpu as gpu


def test_cpu_smoke_run_writes_every_part(tmp_path: Path) -> None:
    path = gpu.main(
        [
            "--device", "cpu", "--kernel-shapes", "tiny", "--kernel-m", "1", "32", "--graph-calls", "2",
            "--replays", "2", "--models", "tiny", "no-such-model", "--decode-tokens", "3", "--prefill", "2x8",
            "--prefill-repeats", "1", "--out-dir", str(tmp_path),
        ]
    )  # fmt: skip
    doc = json.loads(path.read_text())
    assert path.with_suffix(".md").exists() and not list(tmp_path.glob("*.tmp"))
    assert len(doc["kernels"]) == 3 * 2  # 3 tiny shapes x 2 row counts
    for row in doc["kernels"]:
        assert row["baseline_ms"] > 0
        for name, v in row["variants"].items():
            assert name in gpu.VARIANTS
            assert v["speedup"] == pytest.approx(row["baseline_ms"] / v["ms"])
    tiny = [r for r in doc["models"] if r["model"] == "tiny"]
    assert [r["variant"] for r in tiny] == ["float32", *gpu.VARIANTS]
    assert tiny[0]["decode_eager_speedup"] == pytest.approx(1.0)
    for r in tiny[1:]:
        assert r["kernels"] and sum(r["kernels"].values()) == 14  # 2 blocks x 7 linears, LM head kept
        assert r["decode_eager_speedup"] == pytest.approx(tiny[0]["decode_eager_ms"] / r["decode_eager_ms"])
        assert r["prefill_2x8_ms"] > 0
    (bad,) = [r for r in doc["models"] if r["model"] == "no-such-model"]
    assert "error" in bad


def test_time_calls_measures_the_callable() -> None:
    slow, fast = torch.randn(256, 256), torch.randn(8, 8)
    t_slow, method = gpu.time_calls(lambda: slow @ slow @ slow, torch.device("cpu"), calls=3, replays=3)
    t_fast, _ = gpu.time_calls(lambda: fast @ fast, torch.device("cpu"), calls=3, replays=3)
    assert "cpu" in method and t_slow > t_fast > 0
