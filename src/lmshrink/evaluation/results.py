"""Typed, JSON-serializable results of every evaluation; each one records its protocol and provenance."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class EvalResult(BaseModel):
    """Common base: what was measured (``kind``), on which model and data, how (``protocol``), where and when.

    >>> r = EvalResult(kind="demo", model="m", data="d", protocol={}, provenance={})
    >>> r.to_dict()["kind"]
    'demo'
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    kind: str
    model: str
    data: str
    protocol: dict[str, Any] = Field(default_factory=dict)
    provenance: dict[str, Any] = Field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A plain ``dict`` of JSON-compatible values."""
        return self.model_dump(mode="json")

    def to_json(self, indent: int | None = 2) -> str:
        """The result as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent)


class PerplexityResult(EvalResult):
    """Perplexity under a stated protocol. ``nll`` is the mean per scored token (nats); ``perplexity`` is
    ``exp(nll)`` for token level, ``exp(total_nll / n_words)`` for word level (then ``token_perplexity`` keeps the
    token-level figure)."""

    kind: str = "perplexity"
    perplexity: float
    token_perplexity: float
    nll: float
    total_nll: float
    n_tokens: int
    n_windows: int
    n_words: int | None = None
    next_token_accuracy: float


class AgreementResult(EvalResult):
    """How closely a compressed model follows a reference on the same windows: mean per-token
    KL(reference || model) in nats, top-1 agreement, and both perplexities."""

    kind: str = "agreement"
    kl_mean: float
    top1_agreement: float
    perplexity: float
    reference_perplexity: float
    n_tokens: int
    n_windows: int


class AccuracyResult(EvalResult):
    """Sequence-classification accuracy; ``confusion[i][j]`` counts true label ``i`` predicted as ``j``."""

    kind: str = "accuracy"
    accuracy: float
    n_examples: int
    n_correct: int
    confusion: list[list[int]]


class SizeResult(EvalResult):
    """Size of a model. ``bytes_on_disk`` is the sum of the saved files (``None`` when not saved);
    ``parameters`` counts logical weights (tied once, packed quantized weights by their dense shape);
    ``stored_bytes`` is the bytes of all stored tensors in memory; ``bits_per_weight = 8 * stored_bytes /
    parameters``; ``disk_bits_per_weight`` uses the bytes of the saved weight files instead."""

    kind: str = "size"
    bytes_on_disk: int | None
    files: dict[str, int] = Field(default_factory=dict)
    parameters: int
    stored_bytes: int
    bits_per_weight: float
    disk_bits_per_weight: float | None = None
    format: str = "dense"


class LatencyPoint(BaseModel):
    """Timings for one (batch, sequence length) point; latencies in milliseconds."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int
    seq_len: int
    median_ms: float
    p90_ms: float
    tokens_per_s: float
    repeats: int


class SpeedResult(EvalResult):
    """Latency and throughput after warm-up: ``prefill`` (a full forward over ``seq_len`` tokens; the only
    measurement for encoders) and ``decode`` (per generated token with the KV cache, greedy, causal LMs only;
    ``seq_len`` there is the prompt length). ``peak_memory_bytes`` is measured as ``memory_method`` says."""

    kind: str = "speed"
    prefill: list[LatencyPoint]
    decode: list[LatencyPoint] = Field(default_factory=list)
    peak_memory_bytes: int | None
    memory_method: str
    threads: int
