"""``QuantConfig``: the validated description of one whole-model quantization (method, format, layers, options).

>>> cfg = QuantConfig(method="gptq", format="int4", group_size=128)
>>> cfg.weight_spec().bits
4
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lmshrink.errors import LmshrinkError
from lmshrink.models.arch import DEFAULT_SKIP

#: Methods :func:`lmshrink.quantization.api.quantize_model` knows (each one a registered handler).
METHODS: tuple[str, ...] = ("rtn", "gptq", "awq", "smoothquant", "llm-int8")

#: Formats stored as integer codes on a uniform grid (the ``intN`` / ``intN-asym`` family, N in 2..8).
_INT_RE = re.compile(r"^int(\d+)(-asym)?$")
#: Formats whose codec lives in :mod:`lmshrink.quantization.formats` (non-uniform or float codes).
CODEC_FORMATS: tuple[str, ...] = ("nf4", "fp8", "fp16", "bf16", "1bit", "1bit-scaled", "1.58bit")
KNOWN_FORMATS: tuple[str, ...] = ("int8", "int4", "int4-asym", "int3", "int2", *CODEC_FORMATS)


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


@dataclass(frozen=True)
class WeightSpec:
    """How one weight matrix is stored: format, bit width, symmetry and group size (None: per output channel)."""

    format: str
    bits: int
    symmetric: bool
    group_size: int | None

    @property
    def is_integer(self) -> bool:
        return _INT_RE.match(self.format) is not None

    @classmethod
    def parse(cls, fmt: str, group_size: int | None = None, symmetric: bool | None = None) -> WeightSpec:
        """Validate a format name; integer formats get their bit width from the name (``int4`` -> 4)."""
        m = _INT_RE.match(fmt)
        if m:
            bits = int(m.group(1))
            if not 2 <= bits <= 8:
                raise LmshrinkError(f"format {fmt!r}: bits must be in 2..8 for integer formats, got {bits}")
            sym = (m.group(2) is None) if symmetric is None else symmetric
            canonical = f"int{bits}" if sym else f"int{bits}-asym"
            return cls(canonical, bits, sym, group_size)
        if fmt in CODEC_FORMATS:
            bits = {"nf4": 4, "fp8": 8, "fp16": 16, "bf16": 16, "1bit": 1, "1bit-scaled": 1, "1.58bit": 2}[
                fmt
            ]
            return cls(fmt, bits, True, group_size)
        raise LmshrinkError(
            f"unknown format {fmt!r}; accepted: {', '.join(KNOWN_FORMATS)} (or intN / intN-asym)"
        )


class CalibrationConfig(BaseModel):
    """Calibration text for GPTQ/AWQ/SmoothQuant: corpus name, number and length of samples, sampling seed."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = "c4"
    n_samples: int = Field(default=128, ge=1, le=100_000)
    seq_len: int = Field(default=512, ge=8, le=1_000_000)
    seed: int = 0


class QuantConfig(BaseModel):
    """One whole-model quantization. Unknown keys are errors (``extra="forbid"``), so a typo never becomes a default.

    ``alpha`` (SmoothQuant): a fixed migration strength (0.5 in the paper) or "auto", which picks per layer group
    the best of 0.3..0.9 or no smoothing by simulated W8A8 output error on calibration rows.
    ``activations``: "auto" gives SmoothQuant and LLM.int8() int8 per-token activations (W8A8, the fast CPU
    kernel) and every other method float activations (weight-only, dequantized on the fly: accurate, no speed
    claim); "int8" asks for W8A8 with RTN/GPTQ/AWQ int8 per-channel weights (fast, less accurate without smoothing). ``group_size``: None = per output channel, k > 0 = groups of k input columns (must divide every selected layer's
    input dimension; checked before any work). ``targets``/``skip`` are regexes searched in module names.
    """

    model_config = ConfigDict(extra="forbid")

    method: Literal["rtn", "gptq", "awq", "smoothquant", "llm-int8"] = "rtn"
    format: str = "int8"
    group_size: int | None = Field(default=None, ge=1)
    symmetric: bool | None = None
    activations: Literal["auto", "int8", "float"] = "auto"
    targets: list[str] = Field(default_factory=lambda: [r".*"])
    skip: list[str] = Field(default_factory=lambda: list(DEFAULT_SKIP))
    # GPTQ (act-order on by default: with outlier input channels, quantizing them last leaves their error nowhere
    # to go; measured on smollm2-135m int4 g64, KL vs fp32 0.41 -> 0.27; groups stay static, no g_idx needed)
    act_order: bool = True
    damp: float = Field(default=0.01, gt=0.0, le=1.0)
    block_size: int = Field(default=128, ge=1)
    #: GPTQ: inside a block, quantize the layers in execution order (q/k/v, then o, then gate/up, then down), each
    #: group's Hessian taken with the earlier groups already quantized (AutoGPTQ's ``true_sequential``, its default
    #: too); False: every layer of the block sees the float block's inputs (one pass, about half the time).
    #: Measured on smollm2-135m int4 g64, 8,188 WikiText-2 tokens, C4 32 x 512: ppl +35.4% -> +31.5% vs fp32.
    true_sequential: bool = True
    #: GPTQ: rounds of least-squares group-scale refits (the best scales for the codes under the layer's Hessian),
    #: each followed by a GPTQ pass with those scales held fixed; the result with the least calibration error is
    #: kept. 0: the plain algorithm. Same measurement as above, 2 rounds: +35.4% -> +30.4% (GPTQ took ~1.9x as long).
    scale_refit: int = Field(default=2, ge=0, le=10)
    #: Search each group's clipping range on integer grids. RTN and GPTQ: the GPTQ reference's ``mse=True`` (shrink
    #: ``[min, max]`` by 1.00, 0.99, ..., 0.21, keep the least ``sum |w - w_hat|^2.4``); measured on smollm2-135m
    #: int4 g64 (8,188 WikiText-2 tokens, C4 32 x 512) it helps GPTQ (+27.7% -> +27.2% ppl, KL 0.264 -> 0.231;
    #: asymmetric +18.7% -> +16.4%) and symmetric RTN (+49.1% -> +43.7%) but hurts asymmetric RTN (+31.6% ->
    #: +37.6%), and on a float-trained model it is mixed (bench/results/quantize_table_*_mse*.md), so it is off
    #: for them by default. AWQ: the AWQ reference's clip search (each group's clipping value by its share of the
    #: layer's output error on the scaled calibration inputs; q/k projections skipped). Measured the same way:
    #: KL 0.237 -> 0.228 (ppl +25.7% -> +25.9%), asymmetric KL 0.162 -> 0.152 (+19.3% -> +17.5%); mixed on the
    #: float-trained model, so off by default for AWQ too.
    clip_search: bool = False
    # AWQ
    grid: int = Field(default=20, ge=1, le=1000)
    # SmoothQuant
    alpha: float | Literal["auto"] = "auto"
    #: SmoothQuant: "auto" lets a layer keep fp32 outlier columns (threshold ``threshold``) where calibration shows
    #: it at least halves the W8A8 error (see lmshrink.quantization.smoothquant); "none": pure W8A8 everywhere.
    outliers: Literal["auto", "none"] = "auto"
    #: SmoothQuant: regexes of layers that keep float activations (int8 weights, weight-only): the stated fallback
    #: for layers whose activations per-token int8 cannot carry (smollm2-135m: ``["down_proj"]``). No int8 kernel
    #: for those layers.
    float_activations: list[str] = Field(default_factory=list)
    #: SmoothQuant: how the smoothed int8 weights are rounded. "rtn": round to nearest (the paper); "gptq": GPTQ
    #: on the smoothed weights with the Hessian of the smoothed inputs (llm-compressor's W8A8 recipe), using the
    #: GPTQ options above (act_order, damp, block_size, true_sequential, scale_refit). Costs a GPTQ pass (build
    #: 895 s -> 1923 s here). Measured on smollm2-135m, exact W8A8 numerics, the first 8,188 WikiText-2 test tokens,
    #: C4 32 x 512: ppl +1.32% -> +0.95% vs fp32, KL 0.0105 -> 0.0098 (bench/results/*_sqgptq_exact_8k.md); on
    #: 102,350 tokens +0.70% -> +0.88%, KL 0.0105 -> 0.0094 (*_sqgptq_exact_100k.md): lower KL, not perplexity.
    weight_method: Literal["rtn", "gptq"] = "rtn"
    #: Rotate the residual stream by a random orthogonal matrix before quantizing (QuaRot / SpinQuant R1, not
    #: learned; :mod:`lmshrink.quantization.rotation`): the same float function, with the outlier channels spread
    #: over all channels, so W8A8 activations and low-bit weights lose less. Llama-family models only; any method.
    rotate: bool = False
    #: Seed of the random rotation (signs and the non-power-of-two factor).
    rotation_seed: int = 0
    #: With ``rotate``: also multiply each ``down_proj`` input online by a block Walsh-Hadamard matrix (QuaRot's
    #: R4; the weight holds ``W H``), for the SwiGLU outliers the residual rotation does not reach.
    online_hadamard: bool = True
    # LLM.int8()
    threshold: float = Field(default=6.0, gt=0.0)
    calibration: CalibrationConfig = Field(default_factory=lambda: CalibrationConfig())

    def __init__(self, **data: object) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise LmshrinkError(f"invalid quantization config: {_describe(exc)}") from None

    @model_validator(mode="before")
    @classmethod
    def _known_method(cls, data: object) -> object:
        if isinstance(data, dict) and "method" in data and data["method"] not in METHODS:
            raise LmshrinkError(f"unknown method {data['method']!r}; accepted: {', '.join(METHODS)}")
        return data

    @field_validator("alpha")
    @classmethod
    def _valid_alpha(cls, alpha: float | str) -> float | str:
        if alpha != "auto" and not 0.0 <= float(alpha) <= 1.0:
            raise LmshrinkError(f"alpha must be in [0, 1] or 'auto', got {alpha!r}")
        return alpha

    @field_validator("targets", "skip", "float_activations")
    @classmethod
    def _valid_regexes(cls, patterns: list[str]) -> list[str]:
        for p in patterns:
            try:
                re.compile(p)
            except re.error as exc:
                raise LmshrinkError(f"invalid regex {p!r} in targets/skip: {exc}") from exc
        return patterns

    @model_validator(mode="after")
    def _consistent(self) -> QuantConfig:
        spec = self.weight_spec()  # validates the format and bit width
        if self.method in ("smoothquant", "llm-int8") and spec.format != "int8":
            raise LmshrinkError(
                f"method {self.method!r} is W8A8: it needs format 'int8', got {self.format!r}"
            )
        if self.method in ("smoothquant", "llm-int8") and self.group_size is not None:
            raise LmshrinkError(
                f"method {self.method!r} uses per-channel int8 weights; leave group_size unset"
            )
        if self.method in ("gptq", "awq") and not spec.is_integer:
            raise LmshrinkError(
                f"method {self.method!r} needs an integer format (int2..int8, intN-asym), got {self.format!r}"
            )
        if self.clip_search and not (self.method in ("rtn", "gptq", "awq") and spec.is_integer):
            raise LmshrinkError(
                "clip_search applies to methods 'rtn', 'gptq' and 'awq' with an integer format (int2..int8, "
                f"intN-asym), got method {self.method!r} with format {self.format!r}"
            )
        if self.float_activations and self.method != "smoothquant":
            raise LmshrinkError(
                f"float_activations applies to method 'smoothquant' only, got method {self.method!r}"
            )
        if self.weight_method != "rtn" and self.method != "smoothquant":
            raise LmshrinkError(
                f"weight_method applies to method 'smoothquant' only (use method 'gptq' for GPTQ weights), "
                f"got method {self.method!r}"
            )
        if self.activations == "int8" and not (
            spec.format == "int8" and spec.symmetric and self.group_size is None
        ):
            raise LmshrinkError("activations='int8' (W8A8) needs format 'int8' with per-channel weights")
        return self

    @property
    def act_mode(self) -> str:
        """'int8' (dynamic per-token int8 activations, the fast kernel) or 'float' (weight-only)."""
        if self.activations != "auto":
            return self.activations
        return "int8" if self.method in ("smoothquant", "llm-int8") else "float"

    @property
    def needs_calibration(self) -> bool:
        return self.method in ("gptq", "awq", "smoothquant")

    def weight_spec(self) -> WeightSpec:
        """The storage spec every selected layer gets."""
        return WeightSpec.parse(self.format, self.group_size, self.symmetric)
