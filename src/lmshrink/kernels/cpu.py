"""CPU low-precision kernels: fbgemm's int8 GEMM with dynamic per-token activation quantization.

Measured on this project's CPU (torch 2.13, see ``bench/quantize_kernels.py``): ``torch._int_mm`` and the
``_weight_int8pack_mm`` / ``_weight_int4pack_mm_for_cpu`` ops are slower than fp32 ``F.linear``; fbgemm's dynamic int8
linear (``quantized::linear_dynamic``, the op behind ``quantize_dynamic``) is faster. That op quantizes activations
per *tensor*, which breaks models with activation outliers. :func:`int8_linear_per_token` gets per-*token* activation
quantization out of the same kernel: each row of ``x`` is divided by its absmax (so every row spans [-1, 1] and the
per-tensor range is the per-token range), the kernel runs without bias, and the output rows are scaled back.

>>> import torch
>>> w = torch.randn(16, 32)
>>> scale = w.abs().amax(1) / 127
>>> q = torch.round(w / scale[:, None]).to(torch.int8)
>>> packed = prepack_int8(q, scale)
>>> y = int8_linear_per_token(torch.randn(3, 32), packed)
>>> tuple(y.shape)
(3, 16)
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def fbgemm_available() -> bool:
    """True when torch was built with fbgemm and the CPU supports it (x86 with AVX2 or newer)."""
    engines = torch.backends.quantized.supported_engines
    if "fbgemm" not in engines:
        return False
    try:
        q = torch.ones(4, 8, dtype=torch.int8)
        packed = prepack_int8(q, torch.ones(4))
        torch.ops.quantized.linear_dynamic(torch.ones(1, 8), packed, False)
    except (RuntimeError, NotImplementedError) as exc:  # a CPU without AVX2, a build without the op
        log.info("fbgemm int8 kernel unusable here: %s", exc)
        return False
    return True


def prepack_int8(qweight: torch.Tensor, scale: torch.Tensor) -> Any:
    """Pack int8 codes (N, K) with per-output-channel scales (N,) for fbgemm (symmetric, zero point 0)."""
    n = qweight.shape[0]
    qw = torch._make_per_channel_quantized_tensor(
        qweight.contiguous(), scale.detach().double().reshape(n), torch.zeros(n, dtype=torch.long), 0
    )
    return torch.ops.quantized.linear_prepack(qw, None)


@functools.lru_cache(maxsize=1)
def needs_reduce_range() -> bool:
    """Whether the int8 kernel saturates with full-range (8-bit) activations on this CPU.

    Without AVX512-VNNI, fbgemm sums pairs of u8*s8 products in int16 (``vpmaddubsw``), which saturates when both are
    large (255 * 127 * 2 > 32767). This probes the worst case once; if the result is wrong, activations use 7 bits
    (``reduce_range``), which is what ``quantize_dynamic`` does unconditionally.
    """
    k, n = 64, 4
    packed = prepack_int8(torch.full((n, k), 127, dtype=torch.int8), torch.full((n,), 1.0 / 127))
    x = torch.ones(1, k)
    x[0, 0] = 0.0  # range [0, 1] -> zero point 0, every other code 255
    y = torch.ops.quantized.linear_dynamic(x, packed, False)
    exact = float(k - 1)
    saturates = abs(float(y[0, 0]) - exact) > 1e-3 * exact
    if saturates:
        log.warning("fbgemm int8 kernel saturates 8-bit activations on this CPU; using 7-bit activations")
    return saturates


def int8_linear_per_token(x: torch.Tensor, packed: Any, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` with int8 weights (prepacked) and int8 activations quantized per token (row), fp32 out.

    ``x`` is (M, K) float32. For M == 1 per-tensor already is per-token, so the row scaling is skipped.
    """
    rr = needs_reduce_range()
    if x.shape[0] == 1:
        y = torch.ops.quantized.linear_dynamic(x, packed, rr)
        return y if bias is None else y.add_(bias)
    s = x.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12)  # (M, 1)
    y = torch.ops.quantized.linear_dynamic(x / s, packed, rr)
    if bias is None:
        return y.mul_(s)
    return torch.addcmul(bias, y, s)


#: Rows from which :func:`int8_linear_per_token_amx` beats fbgemm on AMX CPUs (measured: bench/quantize_kernels.py).
AMX_MIN_ROWS = 32


@functools.lru_cache(maxsize=1)
def amx_int8_available() -> bool:
    """True on CPUs with AMX-INT8 tiles, where ``torch._int_mm`` (oneDNN) is fast; elsewhere it is 30-100x slower
    than fp32 and must not be used. Decided from the CPU flags (deterministic), then checked for correctness."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "")
    except OSError:
        return False
    if "amx_int8" not in flags.split():
        return False
    try:
        a = torch.randint(-127, 128, (32, 64), dtype=torch.int8)
        b = torch.randint(-127, 128, (16, 64), dtype=torch.int8)
        ok = torch.equal(torch._int_mm(a, b.t()), a.int() @ b.int().t())
    except (RuntimeError, NotImplementedError):
        return False
    return bool(ok)


def int8_linear_per_token_amx(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ W.T + bias`` via ``torch._int_mm`` (AMX): symmetric int8 per-token ``x`` (M, K), int8 ``qweight``
    (N, K) with per-channel ``scale`` (N,), int32 accumulation, fp32 out. For M >= :data:`AMX_MIN_ROWS`."""
    sx = x.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12).div_(127.0)  # (M, 1)
    xq = torch.round(x / sx).to(torch.int8)
    y = torch._int_mm(xq, qweight.t()).float().mul_(sx).mul_(scale)
    return y if bias is None else y.add_(bias)


def quantize_per_token_reference(x: torch.Tensor, reduce_range: bool = False) -> torch.Tensor:
    """Float simulation of the activation quantization :func:`int8_linear_per_token` performs (for tests).

    Mirrors fbgemm's dynamic quantization after row normalisation: asymmetric uint8 over the tensor's [min, max]
    (widened to include 0), applied to ``x / rowabsmax``; returns the dequantized ``x``.
    """
    s = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
    xn = x / s if x.shape[0] > 1 else x
    lo = min(float(xn.min()), 0.0)
    hi = max(float(xn.max()), 0.0)
    qmax = 127 if reduce_range else 255
    scale = (hi - lo) / qmax if hi > lo else 1.0
    zero = min(max(round(-lo / scale), 0), qmax)
    q = torch.clamp(torch.round(xn / scale) + zero, 0, qmax)
    xq = (q - zero) * scale
    return xq * s if x.shape[0] > 1 else xq
