"""Latency/throughput/memory measurement: structure and sanity (timings themselves are machine facts)."""

from __future__ import annotations

import pytest

from lmshrink.errors import LmshrinkError
from lmshrink.evaluation import measure_speed


def test_causal_lm(tiny_llama):
    r = measure_speed(tiny_llama, batch_sizes=(1, 2), seq_lens=(16, 32), decode_tokens=4, repeats=3, warmup=1)
    assert [(p.batch_size, p.seq_len) for p in r.prefill] == [(1, 16), (1, 32), (2, 16), (2, 32)]
    assert all(p.median_ms > 0 and p.p90_ms >= p.median_ms and p.repeats == 3 for p in r.prefill)
    assert r.prefill[0].tokens_per_s == pytest.approx(16 / (r.prefill[0].median_ms / 1e3))
    assert [(p.batch_size, p.seq_len, p.repeats) for p in r.decode] == [(1, 16, 12), (2, 16, 12)]
    assert r.decode[1].tokens_per_s == pytest.approx(2 / (r.decode[1].median_ms / 1e3))
    assert r.peak_memory_bytes is not None and r.peak_memory_bytes >= 0
    assert "psutil" in r.memory_method and r.threads >= 1
    assert r.protocol["task"] == "causal-lm" and r.to_dict()["kind"] == "speed"


def test_encoder_forward_only(tiny_bert):
    r = measure_speed(tiny_bert, batch_sizes=(2,), seq_lens=(16,), repeats=2, warmup=0)
    assert len(r.prefill) == 1 and r.decode == [] and r.protocol["task"] == "encoder"


def test_kv_cache_decode_is_greedy_continuation(tiny_llama):
    """The timed loop produces the same tokens as transformers' greedy generate, and times each step."""
    import torch

    from lmshrink.evaluation.speed import greedy_decode

    prompt = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    times: list[float] = []
    with torch.inference_mode():
        ref = tiny_llama.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)[:, 8:]
        got = greedy_decode(tiny_llama, prompt, 6, {"logits_to_keep": 1}, times)
    assert torch.equal(got, ref) and len(times) == 5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_sizes": ()}, "batch_sizes"),
        ({"seq_lens": (0,)}, "seq_lens"),
        ({"repeats": 0}, "repeats"),
        ({"seq_lens": (300,)}, "exceeds"),
        ({"seq_lens": (250,), "decode_tokens": 10}, "exceeds the context"),
    ],
)
def test_bad_arguments(tiny_llama, kwargs, match):
    with pytest.raises(LmshrinkError, match=match):
        measure_speed(tiny_llama, **kwargs)
