"""Latency, throughput and peak memory, measured after warm-up as medians of repeats on a named device.

- prefill: one forward over ``(batch, seq_len)`` random token ids (for causal LMs with the KV cache on and only
  the last position's logits, as generation does; encoders: a plain forward, the only measurement for them).
- decode (causal LMs): a manual greedy loop with ``past_key_values`` after a prompt of ``min(seq_lens)`` tokens;
  every generated token is timed, and the median/p90 per-token latency is reported per batch size.
- memory: CUDA ``max_memory_allocated`` (includes the weights) or, on CPU, the peak resident set size above the
  baseline before the measurements, sampled every millisecond with psutil (weights already resident excluded).
"""

from __future__ import annotations

import inspect
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import psutil
import torch
from torch import nn

from lmshrink.errors import LmshrinkError
from lmshrink.evaluation.perplexity import model_dtype, model_max_length, model_name, output_head, place_model
from lmshrink.evaluation.results import LatencyPoint, SpeedResult
from lmshrink.utils.env import provenance


class RssSampler:
    """Peak RSS of this process above its value at entry, sampled in a background thread."""

    def __init__(self, interval_s: float = 0.001) -> None:
        self.interval_s = interval_s
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.baseline = 0
        self.peak = 0

    def _sample(self) -> None:
        self.peak = max(self.peak, self._proc.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> RssSampler:
        self.baseline = self.peak = self._proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def delta(self) -> int:
        return self.peak - self.baseline


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _point(batch: int, seq_len: int, times_s: list[float], tokens: int) -> LatencyPoint:
    median = statistics.median(times_s)
    return LatencyPoint(
        batch_size=batch,
        seq_len=seq_len,
        median_ms=median * 1e3,
        p90_ms=_percentile(times_s, 0.9) * 1e3,
        tokens_per_s=tokens / median,
        repeats=len(times_s),
    )


def _timer(device: torch.device) -> Callable[[], float]:
    if device.type == "cuda":

        def now() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()

        return now
    return time.perf_counter


def is_causal_lm(model: nn.Module) -> bool:
    """True when the model generates text (a decoder with an LM head)."""
    can_generate = getattr(model, "can_generate", None)
    return bool(callable(can_generate) and can_generate()) and output_head(model) is not None


def _vocab_size(model: nn.Module) -> int:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and vocab > 0:
        return vocab
    getter = getattr(model, "get_input_embeddings", None)
    emb = getter() if callable(getter) else None
    if isinstance(emb, nn.Embedding):
        return emb.num_embeddings
    raise LmshrinkError(f"cannot tell the vocabulary size of {type(model).__name__}")


def _validate(
    batch_sizes: Sequence[int], seq_lens: Sequence[int], decode_tokens: int, repeats: int, warmup: int
) -> None:
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise LmshrinkError(f"batch_sizes must be positive integers, got {list(batch_sizes)}")
    if not seq_lens or any(s < 1 for s in seq_lens):
        raise LmshrinkError(f"seq_lens must be positive integers, got {list(seq_lens)}")
    if decode_tokens < 0 or repeats < 1 or warmup < 0:
        raise LmshrinkError(
            f"need decode_tokens >= 0, repeats >= 1, warmup >= 0; got {decode_tokens}, {repeats}, {warmup}"
        )


@torch.inference_mode()
def measure_speed(
    model: nn.Module,
    *,
    batch_sizes: Sequence[int] = (1, 8),
    seq_lens: Sequence[int] = (128,),
    decode_tokens: int = 32,
    decode_batch_sizes: Sequence[int] | None = None,
    repeats: int = 5,
    warmup: int = 2,
    device: str | None = None,
    seed: int = 0,
    name: str | None = None,
) -> SpeedResult:
    """Prefill latency/throughput for each ``(batch, seq_len)``, per-token decode latency with the KV cache for
    causal LMs (at each of ``decode_batch_sizes``, default ``batch_sizes``), and peak memory.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> m = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...     num_attention_heads=2, vocab_size=50, max_position_embeddings=64))
    >>> r = measure_speed(m, batch_sizes=(1,), seq_lens=(8,), decode_tokens=4, repeats=2, warmup=1)
    >>> len(r.prefill), r.decode[0].repeats
    (1, 8)
    """
    _validate(batch_sizes, seq_lens, decode_tokens, repeats, warmup)
    dev = place_model(model, device)
    causal = is_causal_lm(model)
    limit = model_max_length(model)
    longest = max(seq_lens) + (decode_tokens if causal else 0)
    if limit is not None and max(seq_lens) > limit:
        raise LmshrinkError(f"seq_len {max(seq_lens)} exceeds the model's maximum context of {limit} tokens")
    if causal and decode_tokens and limit is not None and min(seq_lens) + decode_tokens > limit:
        raise LmshrinkError(
            f"prompt {min(seq_lens)} + decode_tokens {decode_tokens} exceeds the context of {limit}"
        )
    vocab = _vocab_size(model)
    gen = torch.Generator().manual_seed(seed)
    now = _timer(dev)
    keep_last = causal and "logits_to_keep" in inspect.signature(model.forward).parameters
    extra: dict[str, Any] = {"use_cache": True, "logits_to_keep": 1} if keep_last else {}
    was_training = model.training
    model.eval()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    sampler = RssSampler() if dev.type == "cpu" else None
    prefill: list[LatencyPoint] = []
    decode: list[LatencyPoint] = []
    try:
        if sampler is not None:
            sampler.__enter__()
        for b in batch_sizes:
            for s in seq_lens:
                x = torch.randint(0, vocab, (b, s), generator=gen).to(dev)
                kwargs = extra if causal else {"attention_mask": torch.ones_like(x)}
                times = []
                for r in range(warmup + repeats):
                    t0 = now()
                    model(input_ids=x, **kwargs)
                    if r >= warmup:
                        times.append(now() - t0)
                prefill.append(_point(b, s, times, b * s))
        if causal and decode_tokens:
            for b in decode_batch_sizes or batch_sizes:
                decode.append(
                    _decode(model, vocab, b, min(seq_lens), decode_tokens, repeats, warmup, gen, dev, extra)
                )
    finally:
        if sampler is not None:
            sampler.__exit__(None, None, None)
        model.train(was_training)
    if dev.type == "cuda":
        peak: int | None = int(torch.cuda.max_memory_allocated(dev))
        method = "cuda max_memory_allocated (weights included)"
    else:
        assert sampler is not None
        peak = sampler.delta
        method = (
            "cpu peak RSS above the pre-measurement baseline (psutil, sampled every 1 ms; weights excluded)"
        )
    return SpeedResult(
        model=name or model_name(model),
        data="random token ids",
        protocol={
            "batch_sizes": list(batch_sizes),
            "seq_lens": list(seq_lens),
            "decode_tokens": decode_tokens if causal else 0,
            "decode_batch_sizes": list(decode_batch_sizes or batch_sizes) if causal else [],
            "decode_prompt_len": min(seq_lens) if causal else None,
            "repeats": repeats,
            "warmup": warmup,
            "statistic": "median and p90 of repeats after warm-up",
            "task": "causal-lm" if causal else "encoder",
            "prefill_logits": "last position only" if keep_last else "all positions",
            "longest_sequence": longest,
            "inference_mode": True,
        },
        provenance=provenance(dev, model_dtype(model)),
        prefill=prefill,
        decode=decode,
        peak_memory_bytes=peak,
        memory_method=method,
        threads=torch.get_num_threads(),
    )


def greedy_decode(
    model: nn.Module,
    prompt: torch.Tensor,
    n_tokens: int,
    extra: dict[str, Any] | None = None,
    step_times: list[float] | None = None,
) -> torch.Tensor:
    """Greedy continuation of ``prompt`` (B, T) by ``n_tokens`` with the KV cache, one forward per token.

    When ``step_times`` is a list, the seconds of every decode step are appended to it. Returns (B, n_tokens).
    """
    now = _timer(prompt.device)
    kwargs = {**(extra or {}), "use_cache": True}
    out = model(input_ids=prompt, **kwargs)
    past = out.past_key_values
    nxt = out.logits[:, -1:].argmax(-1)  # (B, 1)
    tokens = [nxt]
    for _ in range(n_tokens - 1):
        t0 = now()
        out = model(input_ids=nxt, past_key_values=past, **kwargs)
        past = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        if step_times is not None:
            step_times.append(now() - t0)
        tokens.append(nxt)
    return torch.cat(tokens, dim=1)


def _decode(
    model: nn.Module,
    vocab: int,
    batch: int,
    prompt_len: int,
    n_tokens: int,
    repeats: int,
    warmup: int,
    gen: torch.Generator,
    dev: torch.device,
    extra: dict[str, Any],
) -> LatencyPoint:
    """Greedy decoding with the KV cache; every step of the rounds after warm-up is timed."""
    prompt = torch.randint(0, vocab, (batch, prompt_len), generator=gen).to(dev)
    times: list[float] = []
    for r in range(warmup + repeats):
        greedy_decode(model, prompt, n_tokens + 1, extra, times if r >= warmup else None)
    return _point(batch, prompt_len, times, batch)
