"""Weight formats: real packed storage, decode, fake quantization and exact storage accounting.

Every format takes a weight of shape (out, in) (a 1-D tensor is treated as one row) and quantizes it in groups
along the input dimension. ``group_size`` is read as:

* ``None``: the format's default (:attr:`WeightFormat.default_group_size`): per output channel for the integer
  grids, fp8 and 1bit-scaled, blocks of 64 for nf4 (QLoRA), per tensor for 1.58bit (BitNet b1.58);
* ``-1``: per output channel (one scale per row), whatever the format;
* ``0``: per tensor (one scale for the whole weight);
* ``k > 0``: groups of ``k`` consecutive input columns (``k`` must divide the input dimension).

Storage (what :meth:`WeightFormat.encode` returns, and what :meth:`WeightFormat.storage_bits` counts):

=============  ========================================================================================
int8           codes ``int8`` in [-127, 127], one ``scale`` per group
int4/int3      symmetric codes in [-(2^(b-1)-1), 2^(b-1)-1], offset to unsigned and bit-packed into uint8
int4-asym      codes in [0, 15] with an integer zero point per group (zero points packed at 4 bits too)
int2           symmetric like every ``intN``: codes in {-1, 0, 1} (3 of the 4 levels); ``int2-asym`` uses all 4
nf4            QLoRA NormalFloat-4 codebook indices (two per byte) and one ``absmax`` per block
fp8            ``torch.float8_e4m3fn`` values stored as their uint8 bit pattern, one ``scale`` per group
fp16/bf16      plain casts (``group_size`` is ignored)
1bit           sign bits, 8 per byte, no scale. Convention: ``w > 0`` -> +1, ``w <= 0`` (zero too) -> -1
1bit-scaled    sign bits and one ``scale`` = mean ``|w|`` per group (per row by default)
1.58bit        ternary codes packed in base 3 (5 per byte = 1.6 bits) and ``gamma`` = mean ``|w|``
=============  ========================================================================================

Scales, zero-point-free absmax and gamma are stored as **float16** (``SCALE_DTYPE``); codes are computed with the
fp16-rounded scale, so ``decode(encode(w)) == fake_quantize(w)`` bit for bit. Re-quantizing a fake-quantized weight
reproduces it for the symmetric formats; :meth:`WeightFormat.snap` reaches such a fixed point for every format but
1.58bit (absmean is not a projection: the ternary codes reproduce, gamma shrinks).

>>> fmt = get_format("int4")
>>> w = torch.randn(8, 64)
>>> packed = fmt.encode(w, group_size=32)
>>> packed["codes"].dtype, packed["codes"].numel(), packed["scale"].dtype
(torch.uint8, 256, torch.float16)
>>> fmt.storage_bits(w.shape, 32) == 8 * 64 * 4 + 8 * 2 * 16
True
>>> torch.equal(fmt.decode(packed, w.shape, 32), fmt.fake_quantize(w, 32))
True
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch

from lmshrink.errors import LmshrinkError, NumericsError
from lmshrink.quantization.grid import IntGrid, dequantize_codes, quantize_codes

#: dtype of every stored scale / absmax / gamma.
SCALE_DTYPE = torch.float16
_SCALE_BITS = 16
_FP16_MAX = 65504.0
_FP16_TINY = 2.0**-24  # smallest positive (subnormal) float16

#: QLoRA NormalFloat-4 codebook (Dettmers et al. 2023, appendix E; bitsandbytes ``get_4bit_type("nf4")``).
NF4_CODEBOOK = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)  # fmt: skip
_FP8_MAX = 448.0  # largest finite float8_e4m3fn
_BITNET_EPS = 1e-5

Shape = Sequence[int] | torch.Size


# ----------------------------------------------------------------------------------------------------------------
# bit packing


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (each < 2**bits) into a flat uint8 tensor, least significant bit first.

    Uses exactly ``ceil(codes.numel() * bits / 8)`` bytes. ``bits=4`` gives the same bytes as
    :func:`lmshrink.quantization.grid.pack_int4` (low nibble first).

    >>> pack_bits(torch.tensor([1, 2, 3]), 2)
    tensor([57], dtype=torch.uint8)
    """
    if not 1 <= bits <= 8:
        raise LmshrinkError(f"bits must be in [1, 8], got {bits}")
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat.clone()
    shifts = torch.arange(bits, dtype=torch.uint8, device=flat.device)
    stream = ((flat.unsqueeze(-1) >> shifts) & 1).reshape(-1)  # (n * bits,) bits, LSB first
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat((stream, stream.new_zeros(pad)))
    weights = (1 << torch.arange(8, dtype=torch.int32, device=flat.device)).to(torch.uint8)
    return (stream.reshape(-1, 8) * weights).sum(dim=-1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` codes as a flat uint8 tensor."""
    if not 1 <= bits <= 8:
        raise LmshrinkError(f"bits must be in [1, 8], got {bits}")
    need = math.ceil(numel * bits / 8)
    if packed.dtype != torch.uint8 or packed.numel() < need:
        raise LmshrinkError(
            f"packed codes must be a uint8 tensor of at least {need} bytes for {numel} {bits}-bit codes, "
            f"got {packed.dtype} with {packed.numel()} elements"
        )
    flat = packed.reshape(-1)[:need]
    if bits == 8:
        return flat.clone()
    shifts8 = torch.arange(8, dtype=torch.uint8, device=flat.device)
    stream = ((flat.unsqueeze(-1) >> shifts8) & 1).reshape(-1)[: numel * bits].reshape(numel, bits)
    weights = (1 << torch.arange(bits, dtype=torch.int32, device=flat.device)).to(torch.uint8)
    return (stream * weights).sum(dim=-1, dtype=torch.int32).to(torch.uint8)


_TRITS_PER_BYTE = 5  # 3**5 = 243 <= 256
_POW3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32)


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """Pack ternary codes in {-1, 0, 1} five per byte (base 3): ``ceil(n / 5)`` bytes, 1.6 bits per weight.

    >>> pack_ternary(torch.tensor([-1, 0, 1, 1, -1, 0]))
    tensor([75,  1], dtype=torch.uint8)
    """
    flat = (codes.reshape(-1).to(torch.int32) + 1).clamp(0, 2)
    pad = (-flat.numel()) % _TRITS_PER_BYTE
    if pad:
        flat = torch.cat((flat, flat.new_zeros(pad)))
    pow3 = _POW3.to(flat.device)
    return (flat.reshape(-1, _TRITS_PER_BYTE) * pow3).sum(dim=-1, dtype=torch.int32).to(torch.uint8)


def unpack_ternary(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: the first ``numel`` codes as a flat int8 tensor in {-1, 0, 1}."""
    need = math.ceil(numel / _TRITS_PER_BYTE)
    if packed.dtype != torch.uint8 or packed.numel() < need:
        raise LmshrinkError(
            f"packed ternary codes must be a uint8 tensor of at least {need} bytes for {numel} weights, "
            f"got {packed.dtype} with {packed.numel()} elements"
        )
    b = packed.reshape(-1)[:need].to(torch.int32).unsqueeze(-1)
    trits = (b // _POW3.to(b.device)) % 3
    return (trits.reshape(-1)[:numel] - 1).to(torch.int8)


# ----------------------------------------------------------------------------------------------------------------
# helpers


def _as_2d(w: torch.Tensor) -> torch.Tensor:
    if w.dim() == 1:
        return w.reshape(1, -1)
    if w.dim() != 2:
        raise LmshrinkError(f"expected a weight of shape (out, in) or a vector, got shape {tuple(w.shape)}")
    return w


def _shape_2d(shape: Shape) -> tuple[int, int]:
    dims = tuple(int(d) for d in shape)
    if len(dims) == 1:
        return 1, dims[0]
    if len(dims) != 2:
        raise LmshrinkError(f"expected a weight shape (out, in) or (n,), got {dims}")
    return dims[0], dims[1]


def check_finite(w: torch.Tensor, what: str = "weight") -> None:
    """Raise :class:`NumericsError` if ``w`` holds NaN or Inf, saying how many and where the first one is."""
    bad = ~torch.isfinite(w)
    if bool(bad.any()):
        n_nan = int(torch.isnan(w).sum())
        n_inf = int(bad.sum()) - n_nan
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise NumericsError(
            f"{what} of shape {tuple(w.shape)} contains {n_nan} NaN and {n_inf} Inf values "
            f"(first at index {first}); quantization needs finite weights"
        )


def _n_groups(rows: int, cols: int, group_size: int | None) -> int:
    """Number of scale groups for the resolved grid group size (None = per row, 0 = per tensor)."""
    if group_size is None:
        return rows
    if group_size == 0:
        return 1
    return rows * (cols // group_size)


def _round_scale(scale: torch.Tensor, allow_zero: bool = False) -> torch.Tensor:
    """Round a float32 scale to what float16 storage holds, clamped into the finite positive range (or to
    ``[0, max]`` with ``allow_zero`` when the scale multiplies and never divides)."""
    return scale.clamp(0.0 if allow_zero else _FP16_TINY, _FP16_MAX).to(SCALE_DTYPE).float()


def _grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """View (out, in) as (n_groups_rows, n_groups_cols, g) per the resolved grid group size."""
    rows, cols = w.shape
    if group_size is None:
        return w.reshape(rows, 1, cols)
    if group_size == 0:
        return w.reshape(1, 1, rows * cols)
    return w.reshape(rows, cols // group_size, group_size)


def _expand(p: torch.Tensor, rows: int, cols: int, group_size: int | None) -> torch.Tensor:
    """Broadcast a per-group parameter of shape (r, n_groups) back to (rows, cols)."""
    if group_size is None:
        return p.reshape(rows, 1).expand(rows, cols)
    if group_size == 0:
        return p.reshape(1, 1).expand(rows, cols)
    return p.reshape(rows, -1).repeat_interleave(group_size, dim=1)


# ----------------------------------------------------------------------------------------------------------------
# the format interface


class WeightFormat(ABC):
    """A storage format for weights. Subclasses implement :meth:`_quantize` / :meth:`_dequantize` on 2-D
    weights with a resolved group size, plus packing; the public methods validate and reshape."""

    name: str = ""
    #: nominal bits per weight (scales not counted; 1.58 for ternary)
    bits: float = 0.0
    #: ``group_size=None`` resolves to this (None: per channel, 0: per tensor, k: groups of k)
    default_group_size: int | None = None
    #: whether the format has per-group scales (otherwise ``group_size`` is ignored)
    grouped: bool = True
    #: whether repeated fake quantization reaches a fixed point (see :meth:`snap`)
    has_fixed_point: bool = True

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

    # -- group size handling -------------------------------------------------------------------------------
    def resolve_group_size(self, cols: int, group_size: int | None = None) -> int | None:
        """Grid group size for a weight with ``cols`` input columns: None (per channel), 0 (per tensor) or k."""
        if not self.grouped:
            return None
        g = self.default_group_size if group_size is None else group_size
        if g is None or g == -1:
            return None
        if isinstance(g, bool) or not isinstance(g, int) or g < 0:
            raise LmshrinkError(
                f"group_size must be None (format default), -1 (per channel), 0 (per tensor) or a positive "
                f"divisor of the input dimension, got {g!r}"
            )
        if g > 0 and cols % g != 0:
            raise LmshrinkError(
                f"group size {g} does not divide the input dimension {cols} for format {self.name!r}; "
                f"use a divisor of {cols}, -1 (per channel) or 0 (per tensor)"
            )
        return g

    # -- public API ----------------------------------------------------------------------------------------
    def encode(self, w: torch.Tensor, group_size: int | None = None) -> dict[str, torch.Tensor]:
        """Quantize ``w`` (out, in) and return the real packed storage tensors (see the module table)."""
        w2 = _as_2d(w.detach())
        check_finite(w2)
        g = self.resolve_group_size(w2.shape[1], group_size)
        codes, params = self._quantize(w2.float(), g)
        return {**self._pack(codes), **params}

    def decode(
        self, packed: dict[str, torch.Tensor], shape: Shape, group_size: int | None = None
    ) -> torch.Tensor:
        """Float32 weight of ``shape`` from the tensors :meth:`encode` returned (same ``group_size``)."""
        rows, cols = _shape_2d(shape)
        g = self.resolve_group_size(cols, group_size)
        missing = [k for k in self.storage_keys() if k not in packed]
        if missing:
            raise LmshrinkError(
                f"packed {self.name} weight is missing {missing}; expected keys {list(self.storage_keys())}"
            )
        codes = self._unpack(packed, rows * cols).reshape(rows, cols)
        params = {k: v for k, v in packed.items() if k not in self._code_keys()}
        return self._dequantize(codes, params, g).reshape(tuple(int(d) for d in shape))

    def fake_quantize(self, w: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
        """``decode(encode(w))`` without the packing, in ``w``'s dtype and shape (bit-identical values)."""
        w2 = _as_2d(w.detach())
        check_finite(w2)
        g = self.resolve_group_size(w2.shape[1], group_size)
        codes, params = self._quantize(w2.float(), g)
        return self._dequantize(codes, params, g).reshape(w.shape).to(w.dtype)

    def snap(self, w: torch.Tensor, group_size: int | None = None, max_passes: int = 8) -> torch.Tensor:
        """Fake-quantize ``w`` to a fixed point: re-quantizing the result (same format, group size) gives it back.

        Symmetric grids get there in one pass; asymmetric min/max grids can need a second (a group whose extremes
        miss the end codes shrinks its range once). 1.58bit has no fixed point (absmean gamma shrinks on every
        pass, the ternary codes do not change), so it gets one pass.
        """
        out = self.fake_quantize(w, group_size)
        for _ in range(max_passes - 1 if self.has_fixed_point else 0):
            again = self.fake_quantize(out, group_size)
            if torch.equal(again, out):
                break
            out = again
        return out

    def storage_bits(self, shape: Shape, group_size: int | None = None) -> int:
        """Exact bits of the packed codes plus scales / zero points for a weight of ``shape``."""
        rows, cols = _shape_2d(shape)
        g = self.resolve_group_size(cols, group_size)
        return self._code_bits(rows * cols) + self._param_bits(_n_groups(rows, cols, g))

    def bits_per_weight(self, shape: Shape, group_size: int | None = None) -> float:
        """Effective bits per weight, scales included."""
        rows, cols = _shape_2d(shape)
        return self.storage_bits(shape, group_size) / (rows * cols)

    def storage_keys(self) -> tuple[str, ...]:
        """Names of the tensors :meth:`encode` returns."""
        return self._code_keys() + self._param_keys()

    # -- per-format pieces ---------------------------------------------------------------------------------
    @abstractmethod
    def _quantize(self, w: torch.Tensor, g: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(codes (out, in), stored parameters) of a float32 2-D weight."""

    @abstractmethod
    def _dequantize(
        self, codes: torch.Tensor, params: dict[str, torch.Tensor], g: int | None
    ) -> torch.Tensor:
        """Float32 (out, in) weight from unpacked codes and parameters."""

    @abstractmethod
    def _pack(self, codes: torch.Tensor) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def _unpack(self, packed: dict[str, torch.Tensor], numel: int) -> torch.Tensor: ...

    @abstractmethod
    def _code_bits(self, numel: int) -> int: ...

    def _code_keys(self) -> tuple[str, ...]:
        return ("codes",)

    def _param_keys(self) -> tuple[str, ...]:
        return ("scale",)

    def _param_bits(self, n_groups: int) -> int:
        return n_groups * _SCALE_BITS


class BitPackedFormat(WeightFormat):
    """Codes stored as unsigned ``code_bits``-bit integers in a flat uint8 tensor (int8 stays ``int8``)."""

    code_bits: int = 8
    code_offset: int = 0  # added to the signed code before packing

    def _pack(self, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.code_bits == 8 and self.code_offset == 0:
            return {"codes": codes.to(torch.int8).contiguous()}
        return {"codes": pack_bits(codes.to(torch.int16) + self.code_offset, self.code_bits)}

    def _unpack(self, packed: dict[str, torch.Tensor], numel: int) -> torch.Tensor:
        codes = packed["codes"]
        if self.code_bits == 8 and self.code_offset == 0:
            if codes.dtype != torch.int8 or codes.numel() != numel:
                raise LmshrinkError(
                    f"{self.name} codes must be int8 with {numel} elements, got {codes.dtype}"
                )
            return codes.reshape(-1).to(torch.int16)
        return unpack_bits(codes, self.code_bits, numel).to(torch.int16) - self.code_offset

    def _code_bits(self, numel: int) -> int:
        return numel * self.code_bits


class IntFormat(BitPackedFormat):
    """Integer grid (:class:`IntGrid`) with fp16 scales; asymmetric grids store integer zero points."""

    def __init__(self, name: str, bits: int, symmetric: bool) -> None:
        self.name = name
        self.bits = bits
        self.code_bits = bits
        self.symmetric = symmetric
        self.code_offset = 2 ** (bits - 1) if symmetric and bits < 8 else 0

    def grid(self, group_size: int | None = None, cols: int | None = None) -> IntGrid:
        """The :class:`IntGrid` this format uses (``group_size`` already resolved unless ``cols`` is given)."""
        g = group_size if cols is None else self.resolve_group_size(cols, group_size)
        return IntGrid(self.code_bits, self.symmetric, g)

    def qparams(self, w: torch.Tensor, g: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale (fp16-representable float32) and zero point, shape (rows, n_groups) or (1, 1)."""
        grid = IntGrid(self.code_bits, self.symmetric, g)
        groups = _grouped(w, g)
        if self.symmetric:
            scale = _round_scale(groups.abs().amax(dim=-1) / grid.qmax)
            return scale, torch.zeros_like(scale)
        lo = groups.amin(dim=-1).clamp(max=0)
        hi = groups.amax(dim=-1).clamp(min=0)
        scale = _round_scale((hi - lo) / grid.qmax)
        zero = torch.round(-lo / scale).clamp(0, grid.qmax)
        return scale, zero

    def _quantize(self, w: torch.Tensor, g: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        grid = IntGrid(self.code_bits, self.symmetric, g)
        scale, zero = self.qparams(w, g)
        codes = quantize_codes(w, scale, zero, grid)
        params = {"scale": scale.to(SCALE_DTYPE)}
        if not self.symmetric:
            params["zero"] = pack_bits(zero.to(torch.uint8), self.code_bits)
        return codes, params

    def _dequantize(
        self, codes: torch.Tensor, params: dict[str, torch.Tensor], g: int | None
    ) -> torch.Tensor:
        scale = params["scale"].float()
        if self.symmetric:
            zero = torch.zeros_like(scale)
        else:
            zero = unpack_bits(params["zero"], self.code_bits, scale.numel()).float().reshape(scale.shape)
        return dequantize_codes(codes, scale, zero, IntGrid(self.code_bits, self.symmetric, g))

    def _param_keys(self) -> tuple[str, ...]:
        return ("scale",) if self.symmetric else ("scale", "zero")

    def _param_bits(self, n_groups: int) -> int:
        return n_groups * (_SCALE_BITS + (0 if self.symmetric else self.code_bits))


class NF4Format(BitPackedFormat):
    """QLoRA NormalFloat-4: index of the nearest codebook value of ``w / absmax`` per block; fp16 absmax."""

    name = "nf4"
    bits = 4
    code_bits = 4
    default_group_size = 64

    def _quantize(self, w: torch.Tensor, g: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rows, cols = w.shape
        absmax = _round_scale(_grouped(w, g).abs().amax(dim=-1))
        normed = (w / _expand(absmax, rows, cols, g)).clamp(-1, 1)
        book = NF4_CODEBOOK.to(w.device)
        mids = (book[1:] + book[:-1]) / 2
        codes = torch.bucketize(normed.contiguous(), mids).to(torch.int16)  # nearest codebook entry
        return codes, {"scale": absmax.to(SCALE_DTYPE)}

    def _dequantize(
        self, codes: torch.Tensor, params: dict[str, torch.Tensor], g: int | None
    ) -> torch.Tensor:
        rows, cols = codes.shape
        book = NF4_CODEBOOK.to(codes.device)
        return book[codes.long()] * _expand(params["scale"].float(), rows, cols, g)


class FP8Format(BitPackedFormat):
    """float8 e4m3fn values of ``w / scale`` (scale = absmax / 448 per group), stored as uint8 bit patterns."""

    name = "fp8"
    bits = 8

    def _quantize(self, w: torch.Tensor, g: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rows, cols = w.shape
        scale = _round_scale(_grouped(w, g).abs().amax(dim=-1) / _FP8_MAX)
        scaled = (w / _expand(scale, rows, cols, g)).clamp(-_FP8_MAX, _FP8_MAX)
        return scaled.to(torch.float8_e4m3fn).view(torch.uint8), {"scale": scale.to(SCALE_DTYPE)}

    def _dequantize(
        self, codes: torch.Tensor, params: dict[str, torch.Tensor], g: int | None
    ) -> torch.Tensor:
        rows, cols = codes.shape
        values = codes.to(torch.uint8).view(torch.float8_e4m3fn).float()
        return values * _expand(params["scale"].float(), rows, cols, g)

    def _pack(self, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"codes": codes.to(torch.uint8).contiguous()}

    def _unpack(self, packed: dict[str, torch.Tensor], numel: int) -> torch.Tensor:
        codes = packed["codes"]
        if codes.dtype != torch.uint8 or codes.numel() != numel:
            raise LmshrinkError(f"fp8 codes must be uint8 with {numel} elements, got {codes.dtype}")
        return codes.reshape(-1)


class CastFormat(WeightFormat):
    """A plain cast to a 16-bit float dtype; no scales."""

    grouped = False

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name = name
        self.dtype = dtype
        self.bits = torch.finfo(dtype).bits

    def _quantize(self, w: torch.Tensor, g: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        limit = torch.finfo(self.dtype).max
        if bool((w.abs() > limit).any()):
            raise NumericsError(
                f"weight has values up to {w.abs().max().item():.4g}, beyond the {self.name} range ({limit:.4g})"
            )
        return w.to(self.dtype), {}

    def _dequantize(
        self, codes: torch.Tensor, params: dict[str, torch.Tensor], g: int | None
    ) -> torch.Tensor:
        return codes.float()

    def _pack(self, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"weight": codes.contiguous()}

    def _unpack(self, packed: dict[str, torch.Tensor], numel: int) -> torch.Tensor:
        t = packed["weight"]
        if t.dtype != self.dtype or t.numel() != numel:
            raise LmshrinkError(
                f"{self.name} weight must be {self.dtype} with {numel} elements, got {t.dtype}"
            )
        return t.reshape(-1)

    def _code_bits(self, numel: int) -> int:
        return numel * int(self.bits)

    def _code_keys(self) -> tuple[str, ...]:
        return ("weight",)

    def _param_keys(self) -> tuple[str, ...]:
        return ()

    def _param_bits(self, n_groups: int) -> int:
        return 0


class SignFormat(BitPackedFormat):
    """1 bit per weight: ``w > 0`` -> +1, else -1 (zero maps to -1). ``scaled``: times mean ``|w|`` per group."""

    bits = 1
    code_bits = 1
    code_offset = 0

    def __init__(self, name: str, scaled: bool) -> None:
        self.name = name
        self.scaled = scaled
        self.grouped = scaled

    def _quantize(self, w: torch.Tensor, g: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        codes = torch.where(w > 0, 1, -1).to(torch.int16)
        if not self.scaled:
            return codes, {}
        scale = _round_scale(_grouped(w, g).abs().mean(dim=-1), allow_zero=True)
        return codes, {"scale": scale.to(SCALE_DTYPE)}

    def _dequantize(
        self, codes: torch.Tensor, params: dict[str, torch.Tensor], g: int | None
    ) -> torch.Tensor:
        values = codes.float()
        if not self.scaled:
            return values
        rows, cols = codes.shape
        return values * _expand(params["scale"].float(), rows, cols, g)

    def _pack(self, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"codes": pack_bits(codes > 0, 1)}

    def _unpack(self, packed: dict[str, torch.Tensor], numel: int) -> torch.Tensor:
        return unpack_bits(packed["codes"], 1, numel).to(torch.int16) * 2 - 1

    def _param_keys(self) -> tuple[str, ...]:
        return ("scale",) if self.scaled else ()

    def _param_bits(self, n_groups: int) -> int:
        return n_groups * _SCALE_BITS if self.scaled else 0


class TernaryFormat(WeightFormat):
    """BitNet b1.58 absmean: ``gamma = mean|W|`` (clamped to >= 1e-5), ``W_q = clamp(round(W / gamma), -1, 1)``,
    dequantized ``W_q * gamma``. Per tensor by default (``group_size=-1``: per row; ``k``: groups)."""

    name = "1.58bit"
    bits = math.log2(3)
    default_group_size = 0
    has_fixed_point = False

    def _quantize(self, w: torch.Tensor, g: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rows, cols = w.shape
        gamma = _round_scale(_grouped(w, g).abs().mean(dim=-1).clamp(min=_BITNET_EPS))
        codes = torch.round(w / _expand(gamma, rows, cols, g)).clamp(-1, 1).to(torch.int16)
        return codes, {"scale": gamma.to(SCALE_DTYPE)}

    def _dequantize(
        self, codes: torch.Tensor, params: dict[str, torch.Tensor], g: int | None
    ) -> torch.Tensor:
        rows, cols = codes.shape
        return codes.float() * _expand(params["scale"].float(), rows, cols, g)

    def _pack(self, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"codes": pack_ternary(codes)}

    def _unpack(self, packed: dict[str, torch.Tensor], numel: int) -> torch.Tensor:
        return unpack_ternary(packed["codes"], numel).to(torch.int16)

    def _code_bits(self, numel: int) -> int:
        return math.ceil(numel / _TRITS_PER_BYTE) * 8


# ----------------------------------------------------------------------------------------------------------------
# registry

_REGISTRY: dict[str, Callable[[], WeightFormat]] = {
    "int8": lambda: IntFormat("int8", 8, symmetric=True),
    "int4": lambda: IntFormat("int4", 4, symmetric=True),
    "int4-asym": lambda: IntFormat("int4-asym", 4, symmetric=False),
    "int3": lambda: IntFormat("int3", 3, symmetric=True),
    "int2": lambda: IntFormat("int2", 2, symmetric=True),
    "nf4": NF4Format,
    "fp8": FP8Format,
    "fp16": lambda: CastFormat("fp16", torch.float16),
    "bf16": lambda: CastFormat("bf16", torch.bfloat16),
    "1bit": lambda: SignFormat("1bit", scaled=False),
    "1bit-scaled": lambda: SignFormat("1bit-scaled", scaled=True),
    "1.58bit": TernaryFormat,
}

#: The named formats (besides them, ``get_format`` accepts any ``intN`` / ``intN-asym`` with N in 2..8).
FORMAT_NAMES: tuple[str, ...] = tuple(_REGISTRY)
_INT_RE = re.compile(r"^int([2-8])(-asym)?$")


def get_format(name: str | WeightFormat) -> WeightFormat:
    """The :class:`WeightFormat` called ``name`` (a format instance is returned as is).

    >>> get_format("nf4").bits
    4
    >>> get_format("int3-asym").symmetric
    False
    """
    if isinstance(name, WeightFormat):
        return name
    key = name.lower() if isinstance(name, str) else ""
    factory = _REGISTRY.get(key)
    if factory is not None:
        return factory()
    m = _INT_RE.match(key)
    if m:
        return IntFormat(key, int(m.group(1)), symmetric=m.group(2) is None)
    raise LmshrinkError(
        f"unknown weight format {name!r}; accepted: {', '.join(_REGISTRY)} (and intN / intN-asym, N in 2..8)"
    )
