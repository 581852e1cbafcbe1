"""CPU low-precision kernels: int8 GEMMs with dynamic per-token activation quantization, and weight-only int8/int4.

What runs where (measured with ``bench/quantize_speed.py`` and ``bench/quantize_kernels.py kernels``):

* W8A8 (int8 weights per channel, int8 activations per token): on CPUs with AMX-INT8 (Sapphire Rapids and later)
  ``torch._int_mm`` (oneDNN, AMX tiles) is 5-15x faster than fp32 ``F.linear`` at 1024 rows, but eager activation
  quantization and the int32 -> fp32 rescale cost more than the GEMM itself; :mod:`lmshrink.kernels.cpu_ext` fuses
  both (one C++ pass each), which is what makes the whole-model prefill faster than fp32. Below
  :data:`AMX_MIN_ROWS` rows (decode) and on CPUs without AMX, fbgemm's dynamic int8 linear
  (``quantized::linear_dynamic``) is used. That op quantizes activations per *tensor*, which breaks models with
  activation outliers. :func:`int8_linear_per_token` gets per-*token* activation quantization out of the same
  kernel: each row of ``x`` is divided by its absmax (so every row spans [-1, 1] and the per-tensor range is the
  per-token range), the kernel runs without bias, and the output rows are scaled back. On CPUs without VNNI,
  where fbgemm's int16 pair sums saturate on 8-bit x 8-bit products, each call cuts either the activations or the
  weights to 7 bits, whichever loses less (:class:`Int8Weight`). On AVX2-only CPUs
  ``torch._int_mm`` and the ``_weight_int8pack_mm`` / ``_weight_int4pack_mm_for_cpu`` ops are slower than fp32.
* weight-only int8 / int4 (group-wise): on CPUs with AMX-BF16/AVX512-BF16, few rows use the packed GEMV kernels
  ``_weight_int8pack_mm`` / ``_weight_int4pack_mm_for_cpu`` with bfloat16 activations (with float32 activations
  both are 5-100x slower than fp32), many rows decode the weight to bfloat16 per call and multiply on AMX. Either
  way the activations are rounded to bfloat16 (relative error ~2^-9, far below the weight quantization error).
* weight-only int8 / int4 on AVX2 CPUs without native bfloat16 (AMD Zen 1/2/3, Intel before Cooper Lake): for few
  rows (decode) the C++ GEMV kernels of :mod:`cpu_ext` read the packed codes once and multiply in float32 with FMA
  (activations stay float32); NF4 runs through the same 4-bit kernel with the codebook looked up in registers.
  Measured on smollm2-135m shapes at one row with the weights coming from DRAM, as in a decode step
  (``bench/quantize_kernels.py gemv``, AMD EPYC Zen 1, 2 threads): int8 2.4-3.4x, int4 g64 2.3-3.1x, NF4 1.2-1.6x
  fp32 ``F.linear`` on the block shapes, 4.5x / 4.1x / 1.7x on the 49152 x 576 LM head; with the weight hot in
  cache int8 is only level with fp32 (0.8-1.2x). Many rows (prefill) decode the weight to float32 in one C++ pass
  and run ``F.linear`` (no faster than fp32: prefill is compute-bound and these layers multiply in float32).
  Elsewhere, and for formats without a kernel (NF4, int3, ...), layers dequantize on the fly and claim no speed.

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
import os
from typing import Any

import torch

from lmshrink.kernels import cpu_ext

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def fbgemm_available() -> bool:
    """True when torch was built with fbgemm and the CPU supports it (x86 with AVX2 or newer)."""
    engines = torch.backends.quantized.supported_engines
    if "fbgemm" not in engines:
        return False
    try:
        q = torch.ones(4, 8, dtype=torch.int8)
        packed = _prepack_raw(q, torch.ones(4))
        torch.ops.quantized.linear_dynamic(torch.ones(1, 8), packed, False)
        int8_pairs_saturate()
    except (RuntimeError, NotImplementedError) as exc:  # a CPU without AVX2, a build without the op
        log.info("fbgemm int8 kernel unusable here: %s", exc)
        return False
    return True


def prepack_int8(qweight: torch.Tensor, scale: torch.Tensor) -> Int8Weight:
    """Pack int8 codes (N, K) with per-output-channel scales (N,) for fbgemm (symmetric, zero point 0)."""
    return Int8Weight(qweight, scale)


def _prepack_raw(codes: torch.Tensor, scale: torch.Tensor) -> Any:
    n = codes.shape[0]
    qw = torch._make_per_channel_quantized_tensor(
        codes.contiguous(), scale.detach().double().reshape(n), torch.zeros(n, dtype=torch.long), 0
    )
    return torch.ops.quantized.linear_prepack(qw, None)


def _saturation_probe(w: int) -> bool:
    """True when fbgemm's dynamic int8 linear gets ``sum(255 * w)`` wrong (8-bit activations, all codes 255)."""
    k, n = 64, 4
    packed = _prepack_raw(torch.full((n, k), w, dtype=torch.int8), torch.full((n,), 1.0 / 127))
    x = torch.ones(1, k)
    x[0, 0] = 0.0  # range [0, 1] -> zero point 0, every other code 255
    y = torch.ops.quantized.linear_dynamic(x, packed, False)
    exact = (k - 1) * w / 127
    return abs(float(y[0, 0]) - exact) > 1e-3 * abs(exact)


@functools.lru_cache(maxsize=1)
def int8_pairs_saturate() -> bool:
    """Whether fbgemm's int8 GEMM saturates with 8-bit activations and 8-bit weights on this CPU.

    Without AVX512-VNNI (AVX2-only CPUs such as AMD Zen 1-3), fbgemm sums pairs of u8 * s8 products of adjacent
    input columns in int16 (``vpmaddubsw``), which saturates when both are large (255 * 127 * 2 > 32767). This
    probes that worst case once. Where it saturates, each call either cuts the activations to 7 bits
    (``reduce_range``, what ``quantize_dynamic`` always does) or packs the weights at 7 bits (255 * 64 * 2 = 32640
    fits; probed too); :class:`Int8Weight` picks per call.
    """
    if not _saturation_probe(127):
        return False
    if _saturation_probe(64) or _saturation_probe(-64):  # an unknown kernel: refuse to compute garbage
        raise RuntimeError("fbgemm int8 saturates even on 7-bit weights; int8 activations unusable here")
    log.info("fbgemm int8 kernel saturates 8-bit x 8-bit products on this CPU; choosing W8A7 / W7A8 per call")
    return True


#: Environment variable that makes :class:`Int8Weight` compute exact W8A8 on CPUs whose 8-bit pairs saturate.
INT8_EXACT_ENV = "LMSHRINK_INT8_EXACT"


def int8_exact_mode() -> bool:
    """Whether ``LMSHRINK_INT8_EXACT`` asks for exact W8A8 numerics (set and not "0")."""
    return os.environ.get(INT8_EXACT_ENV, "") not in ("", "0")


#: Activation quantization noise of fbgemm's per-tensor uint8 over a range ``R`` is ``R^2 / 12 / (2^b - 1)^2``; the
#: increase from 8 to 7 bits, per unit of ``R^2``.
_A7_EXTRA = (1.0 / 127**2 - 1.0 / 255**2) / 12.0


class Int8Weight:
    """An int8 weight prepacked for fbgemm, and on CPUs whose 8-bit pairs saturate the choice of how to avoid it.

    Where the kernel is exact (VNNI, AMX) this is one pack and 8-bit activations. Elsewhere each call runs one of
    two exact-in-int16 variants, whichever adds less relative error energy to the product under the usual
    independent-noise model (``|dy|^2 / |y|^2 ~ |dw|^2 / |w|^2 + |dx|^2 / |x|^2``):

    * ``"w8a7"``: the stored codes, activations at 7 bits; adds ``(R^2 / 12) (1/127^2 - 1/255^2) / mean(x^2)``
      for the activations' range ``R``, measured on the call's (row-normalised) input;
    * ``"w7a8"``: the codes halved (``round(q / 2)``, half to even, scale x2), activations at 8 bits; adds
      ``mean((2 round(q/2) - q)^2) / mean(q^2)``, fixed per layer.

    A single-row call (decode) reuses the layer's last decision when there is one: measuring the input costs
    ~16 us, a fifth of a 576 x 576 GEMV on a Zen 1 core.

    Measured on smollm2-135m (4,094 WikiText-2 tokens, ``bench/results/w8a8_saturation_smollm2-135m_4096.json``):
    fixed W7A8 halves RTN W8A8's damage against fixed W8A7 but doubles SmoothQuant's (smoothing moves the
    outliers into the weights); the per-call choice is measured there against both. Each pack is built on first
    use. (Halving beats re-quantizing the codes to a full 7-bit grid, ``round(q * 64 / max|q|)``: that grid's
    ties all break away from zero, a sign-correlated error that cost RTN W8A8 +7.9% against +5.0% for halving.)

    With ``LMSHRINK_INT8_EXACT=1`` in the environment every call instead runs ``"split"``: exact W8A8 numerics (what
    a VNNI CPU computes) from two GEMMs, ``q = 2 floor(q/2) + (q mod 2)``, each half exact at 8-bit activations;
    about half the speed, for measuring the accuracy a model will have on the CPUs it is deployed to.
    """

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor) -> None:
        self.qweight, self.scale = qweight, scale
        self.saturates = int8_pairs_saturate()
        self._packs: dict[str, Any] = {}
        self._last: str | None = None
        self.weight_cost = 0.0
        if self.saturates:
            q = qweight.float()
            # halving moves odd codes by exactly one 8-bit step, even ones not at all
            odd = torch.remainder(q, 2)
            self.weight_cost = float(odd.mean() / q.pow(2).mean().clamp(min=1e-12))

    def choose(self, xn: torch.Tensor) -> str:
        """The variant for the (row-normalised) kernel input ``xn``: "w8a8" where the kernel is exact, else "w8a7"
        or "w7a8" (see the class docstring)."""
        if not self.saturates:
            return "w8a8"
        if int8_exact_mode():
            return "split"
        if xn.shape[0] == 1 and self._last is not None:
            return self._last  # decode: one token follows the layer's last decision (saves ~16 us)
        lo, hi = (float(v) for v in torch.aminmax(xn))
        rng = max(hi, 0.0) - min(lo, 0.0)
        mean_sq = float(torch.linalg.vector_norm(xn)) ** 2 / max(xn.numel(), 1)
        act_cost = rng * rng * _A7_EXTRA / max(mean_sq, 1e-30)
        self._last = "w7a8" if self.weight_cost < act_cost else "w8a7"
        return self._last

    def operands(self, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The codes and per-channel scales ``variant`` multiplies by."""
        if variant == "w7a8":
            return torch.round(self.qweight.float() / 2).to(torch.int8), self.scale * 2
        return self.qweight, self.scale

    def pack(self, variant: str) -> Any:
        """The fbgemm pack ``variant`` runs (for "split", the pair (high part, low part))."""
        if variant in self._packs:
            return self._packs[variant]
        if variant == "split":
            q = self.qweight.to(torch.int16)
            high = torch.div(q, 2, rounding_mode="floor")  # -64..63
            pack = (
                _prepack_raw(high.to(torch.int8), self.scale * 2),
                _prepack_raw((q - 2 * high).to(torch.int8), self.scale),  # 0 or 1
            )
        else:
            pack = _prepack_raw(*self.operands(variant))
        self._packs[variant] = pack
        return pack

    def linear(self, xn: torch.Tensor) -> torch.Tensor:
        """fbgemm's dynamic int8 linear on ``xn`` with the chosen variant (no bias)."""
        variant = self.choose(xn)
        if variant == "split":
            high, low = self.pack("split")
            y = torch.ops.quantized.linear_dynamic(xn, high, False)
            return y.add_(torch.ops.quantized.linear_dynamic(xn, low, False))
        return torch.ops.quantized.linear_dynamic(xn, self.pack(variant), variant == "w8a7")


def int8_kernel_note(kernel_names: Any) -> str | None:
    """A one-line note for reports when one of ``kernel_names`` is an fbgemm W8A8 kernel and this CPU's int8
    pairs saturate (else None)."""
    if not any(str(k).startswith(("fbgemm-int8", "int8-per-token-fbgemm")) for k in kernel_names):
        return None
    if not fbgemm_available() or not int8_pairs_saturate():
        return None
    decode = "one-row calls (decode) run the int8 weights through the AVX2 GEMV with float activations"
    if int8_exact_mode():
        return (
            f"no VNNI here; {INT8_EXACT_ENV}=1: every int8 call computes exact W8A8 (what VNNI CPUs and GPUs give) "
            f"with two fbgemm GEMMs, about half the speed; {decode}"
        )
    return (
        "no VNNI here: fbgemm's int16 pair sums saturate on 8-bit x 8-bit products, so each int8 call runs "
        f"8-bit weights x 7-bit activations or 7-bit weights x 8-bit activations, whichever loses less; {decode}. "
        f"{INT8_EXACT_ENV}=1 computes exact W8A8 (what VNNI CPUs and GPUs give) at about half the speed; int8 "
        "weight-only (--activations float) is usually the more accurate choice on this CPU"
    )


def int8_linear_per_token(
    x: torch.Tensor, packed: Int8Weight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ W.T + bias`` with int8 weights (prepacked) and int8 activations quantized per token (row), fp32 out.

    ``x`` is (M, K) float32. For M == 1 per-tensor already is per-token, so the row scaling is skipped.
    """
    if x.shape[0] == 1:
        y = packed.linear(x)
        return y if bias is None else y.add_(bias)
    s = x.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12)  # (M, 1)
    y = packed.linear(x / s)
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


def quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 codes of ``x`` (M, K) float32 and their scales (M, 1): ``s = max|x_row| / 127``,
    ``q = round(x / s)`` (half to even). Fused C++ (:mod:`lmshrink.kernels.cpu_ext`) when built, else eager; the two
    give identical results."""
    ext = cpu_ext.load()
    if ext is not None and x.dtype == torch.float32:
        q, s = ext.quantize_rows(x.contiguous())
        return q, s
    s = x.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12).div_(127.0)
    return torch.round(x / s).clamp_(-127, 127).to(torch.int8), s


def rescale_int32(
    acc: torch.Tensor, sx: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``float(acc) * sx * scale (+ bias)`` for an int32 GEMM output (M, N), row scales ``sx`` (M, 1) and column
    scales ``scale`` (N,): one fused pass when the C++ helpers are built, else eager (identical results)."""
    ext = cpu_ext.load()
    if ext is not None and scale.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32):
        return ext.rescale(acc.contiguous(), sx.contiguous(), scale.contiguous(), bias)
    y = acc.float().mul_(sx).mul_(scale)
    return y if bias is None else y.add_(bias)


def int8_linear_per_token_amx(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ W.T + bias`` via ``torch._int_mm`` (AMX): symmetric int8 per-token ``x`` (M, K), int8 ``qweight``
    (N, K) with per-channel ``scale`` (N,), int32 accumulation, fp32 out. For M >= :data:`AMX_MIN_ROWS`.

    The activation quantization and the int32 -> float32 rescale are fused (:mod:`lmshrink.kernels.cpu_ext`); in
    eager PyTorch they cost more than the AMX GEMM itself at SmolLM2's shapes.
    """
    xq, sx = quantize_per_token_int8(x)
    return rescale_int32(torch._int_mm(xq, qweight.t()), sx, scale, bias)


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


# ---- weight-only (int8 / int4) on CPUs with native bfloat16 matmuls (AMX-BF16 / AVX512-BF16) ------------------
#: Rows below which weight-only layers use the packed GEMV kernels (``_weight_int8pack_mm`` /
#: ``_weight_int4pack_mm_for_cpu``); from here on the weight is decoded to bfloat16 and multiplied on AMX.
WEIGHT_ONLY_GEMV_MAX_ROWS = 8


@functools.lru_cache(maxsize=1)
def bf16_matmul_available() -> bool:
    """True on CPUs with AMX-BF16 or AVX512-BF16, where oneDNN's bfloat16 GEMM is several times faster than fp32
    and the packed int8/int4 weight-only kernels are fast for bfloat16 activations (on other CPUs both are slower
    than fp32 and weight-only layers dequantize on the fly)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = set(next((line for line in fh if line.startswith("flags")), "").split())
    except OSError:
        return False
    if not ({"amx_bf16", "avx512_bf16"} & flags) or not torch.backends.mkldnn.is_available():
        return False
    try:
        a, b = torch.randn(4, 32), torch.randn(8, 32)
        y = torch.nn.functional.linear(a.bfloat16(), b.bfloat16()).float()
        return bool(((y - a @ b.t()).abs().max() < 0.1 * (a @ b.t()).abs().max()).item())
    except (RuntimeError, NotImplementedError):
        return False


def int8_weight_only_bf16(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    ones: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ (qweight * scale).T + bias`` with bfloat16 activations: int8 codes (exact in bf16) times ``x`` rounded
    to bf16, the fp32 per-channel scale applied to the (bf16-rounded) output. Few rows: ``_weight_int8pack_mm``
    (reads the int8 weight directly; ``ones`` is a cached bf16 vector of N ones, its unit scales); many rows: the
    codes are cast to bf16 per call and multiplied on AMX."""
    xb = x.to(torch.bfloat16)
    if x.shape[0] <= WEIGHT_ONLY_GEMV_MAX_ROWS:
        if ones is None:
            ones = torch.ones(qweight.shape[0], dtype=torch.bfloat16)
        acc = torch.ops.aten._weight_int8pack_mm(xb, qweight, ones)
    else:
        acc = torch.nn.functional.linear(xb, qweight.to(torch.bfloat16))
    # bf16 * fp32 promotes to fp32 inside one kernel (no separate cast pass)
    return torch.mul(acc, scale) if bias is None else torch.addcmul(bias, acc, scale)


def pack_int4_cpu(
    codes_u4: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, qmin: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsigned 4-bit codes (N, K) with scales (N, G) and zero points (N, G) or ``None`` (symmetric, ``qmin`` -8)
    to ``_weight_int4pack_mm_for_cpu``'s layout; it computes ``(u - 8) * s + zf``, so ``zf = (8 + qmin - z) * s``."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes_u4.to(torch.int32).contiguous(), 1)
    s = scale.float()
    z = zero.float() if zero is not None else torch.zeros_like(s)
    zf = (8.0 + qmin - z) * s
    sz = torch.stack([s, zf], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # (G, N, 2)
    return packed, sz


def int4_weight_only_bf16(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    qmin: int,
    group_size: int,
    tinygemm: tuple[torch.Tensor, torch.Tensor],
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Group-wise int4 weight-only linear with bfloat16 activations: ``_weight_int4pack_mm_for_cpu`` for few rows,
    else the bit-packed codes are decoded to bf16 in one fused pass (:mod:`cpu_ext`) and multiplied on AMX."""
    xb = x.to(torch.bfloat16)
    ext = cpu_ext.load()
    if x.shape[0] <= WEIGHT_ONLY_GEMV_MAX_ROWS or ext is None:
        packed, sz = tinygemm
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, group_size, sz)
    else:
        w = ext.dequant_int4_bf16(qweight, scale, zero, x.shape[1], qmin)
        y = torch.nn.functional.linear(xb, w)
    return y.float() if bias is None else torch.add(bias, y)  # bf16 + fp32 -> fp32 in one kernel


# ---- weight-only (int8 / int4) with float32 activations on AVX2 + FMA CPUs ------------------------------------
#: Rows up to which the AVX2 GEMV kernels beat fp32 ``F.linear`` on smollm2-135m shapes (``bench/quantize_kernels.py
#: gemv``, AMD EPYC AVX2, 2 threads): int8 stays ahead to 16 rows, int4 g64 to 8; above, the weight is dequantized.
AVX2_INT8_GEMV_MAX_ROWS = 16
AVX2_INT4_GEMV_MAX_ROWS = 8
#: NF4's codebook lookup costs more per code: the GEMV stays ahead of dequantize + ``F.linear`` to 4 rows.
AVX2_NF4_GEMV_MAX_ROWS = 4


@functools.lru_cache(maxsize=1)
def avx2_gemv_available() -> bool:
    """True when the CPU has AVX2 and FMA and the C++ GEMV kernels are built (they are compiled for AVX2 + FMA and
    must not run elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = set(next((line for line in fh if line.startswith("flags")), "").split())
    except OSError:
        return False
    return {"avx2", "fma"} <= flags and cpu_ext.load() is not None


def int8_weight_only_avx2(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ (qweight * scale[:, None]).T + bias`` in float32: the AVX2 GEMV for up to
    :data:`AVX2_INT8_GEMV_MAX_ROWS` rows, else dequantize + ``F.linear``."""
    ext = cpu_ext.load()
    if x.shape[0] <= AVX2_INT8_GEMV_MAX_ROWS and ext is not None:
        return ext.int8_wo_gemv(x.contiguous(), qweight, scale, bias)
    w = (
        ext.dequant_int8_f32(qweight, scale)
        if ext is not None
        else qweight.float().mul_(scale.reshape(-1, 1))
    )
    return torch.nn.functional.linear(x, w, bias)


def int4_weight_only_avx2(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale_f32: torch.Tensor,
    offset: torch.Tensor,
    dequantize: Any,
    bias: torch.Tensor | None = None,
    lut: torch.Tensor | None = None,
) -> torch.Tensor:
    """Group-wise 4-bit weight-only linear in float32: ``w = (u + offset) * scale`` per (row, group), with bit-packed
    unsigned codes ``u`` (N, K/2), ``scale_f32`` and ``offset`` (= qmin - zero) float32 (N, G); with ``lut`` (16
    float32, e.g. the NF4 codebook) ``w = (lut[u] + offset) * scale``. The AVX2 GEMV for up to
    :data:`AVX2_INT4_GEMV_MAX_ROWS` rows (:data:`AVX2_NF4_GEMV_MAX_ROWS` with ``lut``), else ``F.linear`` on the
    float32 weight (one C++ pass; ``dequantize()`` when the extension is missing)."""
    ext = cpu_ext.load()
    max_rows = AVX2_INT4_GEMV_MAX_ROWS if lut is None else AVX2_NF4_GEMV_MAX_ROWS
    if x.shape[0] <= max_rows and ext is not None:
        return ext.int4_wo_gemv(x.contiguous(), qweight, scale_f32, offset, bias, lut)
    w = ext.dequant_4bit_f32(qweight, scale_f32, offset, lut) if ext is not None else dequantize()
    return torch.nn.functional.linear(x, w, bias)
