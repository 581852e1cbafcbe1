"""LLM.int8() (Dettmers et al. 2022): int8 matmul with the outlier feature dimensions kept in 16-bit.

``x @ w`` is split along the inner (feature) dimension. Feature columns of ``x`` where any token has
``|x| > threshold`` ("outliers"), with the matching rows of ``w``, are multiplied in fp16; the rest is quantized
with AbsMax to int8 (``x`` per row/token, ``w`` per output column, :class:`QuantizedVector`), multiplied with int32
accumulation, and dequantized by the outer product of the two scale vectors.

This module is the reference implementation, written for correctness: the int8 product uses ``torch._int_mm``
(int8 x int8 -> int32) where the backend supports the shapes, else an exact int32 matmul (CPU) or float64 matmul
(other devices; exact, since every partial sum is below 2**31). On CPU the fp16 outlier product casts the operands
to fp16 and multiplies them in float32 (fp16 GEMM on CPU is slow or missing); on GPU it is a true fp16 matmul (fp32
accumulation inside). Fast kernels live in ``lmshrink.kernels``.

>>> x = torch.randn(4, 16); x[:, 3] = 50.0  # an outlier feature
>>> w = torch.randn(16, 8)
>>> y, stats = mixed_precision_forward(x, w, threshold=6.0, return_stats=True)
>>> stats.n_outlier_columns, y.shape
(1, torch.Size([4, 8]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, overload

import torch

from lmshrink.errors import LmshrinkError
from lmshrink.quantization.formats import check_finite
from lmshrink.quantization.vector import QuantizedVector

WeightLayout = Literal["in_out", "out_in"]
_INT32_MAX = 2**31 - 1


@dataclass
class Int8MatmulStats:
    """What :func:`mixed_precision_forward` did: which feature columns went through fp16."""

    in_features: int
    outlier_columns: list[int] = field(default_factory=list)
    int_backend: str = "none"  # "_int_mm", "int32-matmul", "float64-matmul" or "none" (all columns outliers)

    @property
    def n_outlier_columns(self) -> int:
        return len(self.outlier_columns)

    @property
    def outlier_fraction(self) -> float:
        return self.n_outlier_columns / max(self.in_features, 1)


def int8_matmul_int32(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Exact int8 (m, k) @ int8 (k, n) -> int32 (m, n), and the backend used."""
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise LmshrinkError(f"int8_matmul_int32 needs int8 operands, got {a.dtype} and {b.dtype}")
    if a.shape[1] * 127 * 127 > _INT32_MAX:
        raise LmshrinkError(f"inner dimension {a.shape[1]} may overflow int32 accumulation (max 133,144)")
    try:
        return torch._int_mm(a.contiguous(), b.contiguous()), "_int_mm"
    except RuntimeError:  # shapes the int8 GEMM rejects (e.g. CUDA wants m > 16, k and n multiples of 8)
        pass
    if a.device.type == "cpu":
        return a.to(torch.int32) @ b.to(torch.int32), "int32-matmul"
    # integer matmul is CPU-only; float64 holds every partial sum (< 2**31 < 2**53) exactly
    return (a.double() @ b.double()).to(torch.int32), "float64-matmul"


def _fp16_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a16, b16 = a.to(torch.float16), b.to(torch.float16)
    if a.device.type == "cuda":
        return (a16 @ b16).float()
    return a16.float() @ b16.float()  # fp16 operands, fp32 accumulation (CPU)


@overload
def mixed_precision_forward(
    x: torch.Tensor,
    w: torch.Tensor,
    threshold: float = ...,
    *,
    weight_layout: WeightLayout = ...,
    return_stats: Literal[False] = ...,
) -> torch.Tensor: ...


@overload
def mixed_precision_forward(
    x: torch.Tensor,
    w: torch.Tensor,
    threshold: float = ...,
    *,
    weight_layout: WeightLayout = ...,
    return_stats: Literal[True],
) -> tuple[torch.Tensor, Int8MatmulStats]: ...


def mixed_precision_forward(
    x: torch.Tensor,
    w: torch.Tensor,
    threshold: float = 6.0,
    *,
    weight_layout: WeightLayout = "in_out",
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, Int8MatmulStats]:
    """LLM.int8() product ``x @ w`` with outlier features in fp16 (see the module docstring).

    Args:
        x: activations (tokens, in_features); leading batch dimensions are flattened and restored.
        w: weight (in_features, out_features) with ``weight_layout="in_out"`` (the lab's layout), or
            (out_features, in_features) with ``weight_layout="out_in"`` (``nn.Linear.weight``).
        threshold: a feature column is an outlier if any ``|x|`` in it exceeds this; ``inf`` gives plain int8.
        return_stats: also return :class:`Int8MatmulStats`.

    Returns:
        (tokens, out_features) in ``x``'s dtype, and the stats if asked.
    """
    if weight_layout not in ("in_out", "out_in"):
        raise LmshrinkError(f"weight_layout must be 'in_out' or 'out_in', got {weight_layout!r}")
    if math.isnan(threshold) or threshold < 0:
        raise LmshrinkError(f"threshold must be >= 0 (inf disables outlier handling), got {threshold}")
    w_io = w if weight_layout == "in_out" else w.t()
    if x.shape[-1] != w_io.shape[0] or w_io.dim() != 2:
        raise LmshrinkError(
            f"shape mismatch: x {tuple(x.shape)} against w {tuple(w.shape)} with weight_layout={weight_layout!r}"
        )
    check_finite(x, "activations")
    check_finite(w, "weight")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).float()
    w2 = w_io.float()

    outliers = (x2.abs() > threshold).any(dim=0)  # (in_features,)
    stats = Int8MatmulStats(in_features=x2.shape[1], outlier_columns=outliers.nonzero().flatten().tolist())
    out = torch.zeros(x2.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    if stats.n_outlier_columns:
        out += _fp16_matmul(x2[:, outliers], w2[outliers])
    regular = ~outliers
    if bool(regular.any()):
        qx = QuantizedVector(x2[:, regular], "int8", dim=-1).quantize()  # per token
        qw = QuantizedVector(w2[regular], "int8", dim=0).quantize()  # per output column
        assert qx.data is not None and qw.data is not None and qx.scale is not None and qw.scale is not None
        acc, stats.int_backend = int8_matmul_int32(qx.data, qw.data)
        out += acc.float() / (qx.scale * qw.scale)  # (tokens, 1) * (1, out): outer product of the scales
    y = out.to(x.dtype).reshape(*lead, w2.shape[1])
    return (y, stats) if return_stats else y
