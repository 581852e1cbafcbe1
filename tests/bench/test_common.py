"""The bench harness's cached reference gives exactly the numbers of the uncached one."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

from lmshrink.evaluation.agreement import evaluate_agreement

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from common import CachedReference


def test_cached_reference_matches_uncached_and_runs_body_once_per_window(tiny_llama) -> None:
    ref = tiny_llama
    other = copy.deepcopy(ref)
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.mul_(0.5)
    ids = torch.randint(0, 128, (256,))
    plain = evaluate_agreement(other, ref, None, ids, ctx=64, progress=False)
    cached = CachedReference(ref)
    calls = []
    cached.base_model.inner.register_forward_hook(lambda *a: calls.append(1))
    first = evaluate_agreement(other, cached, None, ids, ctx=64, progress=False)
    second = evaluate_agreement(other, cached, None, ids, ctx=64, progress=False)
    assert plain.kl_mean > 0
    for r in (first, second):
        assert r.kl_mean == plain.kl_mean
        assert r.top1_agreement == plain.top1_agreement
        assert r.perplexity == plain.perplexity
        assert r.reference_perplexity == plain.reference_perplexity
    assert len(calls) == 4  # 4 windows of 64, the body ran once per window for both evaluations


def test_cached_reference_recomputes_for_new_windows(tiny_llama) -> None:
    ref = tiny_llama
    cached = CachedReference(ref)
    a = torch.randint(0, 128, (128,))
    b = (a + 1) % 128
    ra = evaluate_agreement(ref, cached, None, a, ctx=64, progress=False)
    rb = evaluate_agreement(ref, cached, None, b, ctx=64, progress=False)
    assert ra.kl_mean < 1e-9 and rb.kl_mean < 1e-9  # the same model: no stale hidden states reused
    assert len(cached.base_model.memo) == 4


def _doc(rows: list[dict], **settings: object) -> dict:
    base = {"model": "m", "max_tokens": 2048, "ctx": 2048, "speed": False, **settings}
    prov = {"device_name": "cpu", "date": "2026-12-01"}
    return {"settings": base, "rows": rows, "command": "python x", "provenance": prov}


def test_combine_joins_quality_runs_and_speed_by_row_key() -> None:
    from combine import combine, merge_quality

    fp32 = {"key": "fp32", "perplexity": 10.0, "status": "ok"}
    q1 = _doc([fp32, {"key": "a", "perplexity": 11.0, "status": "ok"}, {"key": "b", "perplexity": 99.0}])
    q2 = _doc([fp32, {"key": "b", "perplexity": 12.0, "status": "ok"}])
    speed = _doc([{"key": "fp32"}, {"key": "a", "speed": {"decode_speedup": 1.5}, "status": "ok"}])
    doc = combine(merge_quality([q1, q2]), speed)
    rows = {r["key"]: r for r in doc["rows"]}
    assert [r["key"] for r in doc["rows"]] == ["fp32", "a", "b"]
    assert rows["b"]["perplexity"] == 12.0  # the later quality run replaces the row
    assert rows["a"]["speed"] == {"decode_speedup": 1.5}
    assert rows["b"]["speed_status"] == "not timed"
    assert len(doc["sources"]["quality"]) == 2


def test_combine_refuses_runs_of_different_windows() -> None:
    import pytest
    from combine import merge_quality

    q1 = _doc([{"key": "fp32", "perplexity": 10.0}])
    q2 = _doc([{"key": "fp32", "perplexity": 10.5}])
    with pytest.raises(SystemExit, match="not the same windows"):
        merge_quality([q1, q2])
    with pytest.raises(SystemExit, match="max_tokens"):
        merge_quality([q1, _doc([{"key": "fp32", "perplexity": 10.0}], max_tokens=4096)])
