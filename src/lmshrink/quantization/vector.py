"""The lab's ``QuantizedVector``: quantize one vector (or each row / column of a matrix) and back.

The lab formats follow the exercise literally:

* ``int8``: AbsMax. ``scale = 127 / max|x|`` (a multiplier), ``data = round(x * scale)`` as int8,
  ``dequantize() = data / scale``.
* ``fp16`` / ``bf16``: a cast.
* ``1bit``: ``x > 0`` -> +1, ``x <= 0`` -> -1 (zero maps to -1); no scale, so ``dequantize()`` is the sign.
* ``1.58bit``: BitNet b1.58 absmean. ``scale = 1 / max(mean|x|, 1e-5)``, ``data = clamp(round(x * scale), -1, 1)``.

``dim`` picks the reduction for the scale: ``None`` one scale for the whole tensor, ``dim=-1`` one scale per row
(the LLM.int8() activations), ``dim=0`` one per column (the LLM.int8() weights).

Every other name of :data:`lmshrink.quantization.formats.FORMAT_NAMES` (``int4``, ``int4-asym``, ``int3``,
``int2``, ``nf4``, ``fp8``, ``1bit-scaled``) delegates to :func:`~lmshrink.quantization.formats.get_format`
with ``group_size`` (a vector is one row; a matrix is quantized along its last dimension).

``nbytes`` / ``storage_bits`` count the real packed storage: int8 codes and float32 scales, sign bits packed 8
per byte, ternary codes 5 per byte, the formats' packed tensors.

>>> x = torch.tensor([0.5, -1.0, 0.25, 0.0])
>>> qv = QuantizedVector(x, "int8").quantize()
>>> qv.data.tolist(), round(qv.scale.item(), 3)
([64, -127, 32, 0], 127.0)
>>> QuantizedVector(x, "1.58bit").quantize().data.tolist()
[1, -1, 1, 0]
"""

from __future__ import annotations

import torch

from lmshrink.errors import LmshrinkError
from lmshrink.quantization.formats import (
    FORMAT_NAMES,
    WeightFormat,
    check_finite,
    get_format,
    pack_bits,
    pack_ternary,
)

LAB_FORMATS: tuple[str, ...] = ("int8", "fp16", "bf16", "1bit", "1.58bit")
_EPS = 1e-5


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class QuantizedVector:
    """A vector (or matrix) quantized to ``fmt``; see the module docstring for each format.

    ``data`` holds the codes (int8 for int8/1bit/1.58bit, the cast tensor for fp16/bf16, ``None`` for the
    delegated formats), ``scale`` the multiplier (``data ≈ x * scale``) or ``None``, ``packed`` the real
    storage tensors. ``quantize()`` returns ``self`` so calls chain.
    """

    def __init__(
        self, x: torch.Tensor, fmt: str = "int8", *, dim: int | None = None, group_size: int | None = None
    ) -> None:
        if fmt not in FORMAT_NAMES:
            raise LmshrinkError(
                f"unknown format {fmt!r} for QuantizedVector; accepted: {', '.join(FORMAT_NAMES)}"
            )
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise LmshrinkError(f"QuantizedVector needs a floating-point tensor, got {type(x).__name__}")
        if dim is not None and fmt not in LAB_FORMATS:
            raise LmshrinkError(
                f"dim= applies to the lab formats {LAB_FORMATS}; {fmt!r} quantizes along the last dimension "
                "with group_size= instead"
            )
        self.vector = x
        self.fmt = fmt
        self.dim = dim
        self.group_size = group_size
        self.shape = x.shape
        self.dtype = x.dtype
        self.data: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None
        self.packed: dict[str, torch.Tensor] = {}
        self._format: WeightFormat | None = None if fmt in LAB_FORMATS else get_format(fmt)

    # -- quantize --------------------------------------------------------------------------------------------
    def _reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        if self.dim is None:
            return t.amax() if op == "max" else t.mean()
        return t.amax(dim=self.dim, keepdim=True) if op == "max" else t.mean(dim=self.dim, keepdim=True)

    def quantize(self) -> QuantizedVector:
        """Quantize ``self.vector``; fills ``data``, ``scale`` and ``packed``. Returns ``self``."""
        x = self.vector.detach()
        check_finite(x, "vector")
        xf = x.float()
        if self._format is not None:
            self.packed = self._format.encode(xf, self.group_size)
        elif self.fmt == "int8":
            absmax = self._reduce(xf.abs(), "max")
            self.scale = torch.where(absmax > 0, 127.0 / absmax, torch.ones_like(absmax))
            self.data = torch.round(xf * self.scale).clamp(-127, 127).to(torch.int8)
            self.packed = {"codes": self.data, "scale": self.scale}
        elif self.fmt in ("fp16", "bf16"):
            self.data = x.to(torch.float16 if self.fmt == "fp16" else torch.bfloat16)
            self.packed = {"weight": self.data}
        elif self.fmt == "1bit":
            self.data = torch.where(xf > 0, 1, -1).to(torch.int8)
            self.packed = {"codes": pack_bits(self.data > 0, 1)}
        else:  # 1.58bit
            self.scale = 1.0 / self._reduce(xf.abs(), "mean").clamp(min=_EPS)
            self.data = torch.round(xf * self.scale).clamp(-1, 1).to(torch.int8)
            self.packed = {"codes": pack_ternary(self.data), "scale": self.scale}
        return self

    # -- dequantize ------------------------------------------------------------------------------------------
    def dequantize(self) -> torch.Tensor:
        """Float32 reconstruction of the vector (shape of the input)."""
        if not self.packed:
            raise LmshrinkError("call quantize() before dequantize()")
        if self._format is not None:
            return self._format.decode(self.packed, self.shape, self.group_size)
        assert self.data is not None  # set by quantize() for every lab format
        if self.scale is None:
            return self.data.float()
        return self.data.float() / self.scale

    # -- storage ---------------------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes of the packed storage (codes and scales)."""
        if not self.packed:
            raise LmshrinkError("call quantize() before asking for nbytes")
        return sum(_tensor_bytes(t) for t in self.packed.values())

    @property
    def storage_bits(self) -> int:
        """Bits of the packed storage: exact for the formats, whole bytes for the lab formats."""
        if self._format is not None:
            return self._format.storage_bits(self.shape, self.group_size)
        return 8 * self.nbytes

    @property
    def compression_ratio(self) -> float:
        """Bytes of the input tensor divided by the bytes of the packed storage."""
        return _tensor_bytes(self.vector) / self.nbytes

    def __repr__(self) -> str:
        state = f"{self.nbytes} bytes" if self.packed else "not quantized"
        return f"QuantizedVector(fmt={self.fmt!r}, shape={tuple(self.shape)}, {state})"
