"""Integer quantization grids: the pure tensor math shared by RTN, GPTQ, AWQ, QAT and the QuantizedVector.

A weight ``w`` of shape (out, in) is split along its last dimension into groups of ``group_size`` columns
(``group_size=None``: one group per row, i.e. per-channel; ``group_size=0``: one group for the whole tensor).
Each group has a ``scale`` (and, for asymmetric grids, an integer ``zero`` point):

* symmetric, b bits:   q = clamp(round(w / s), -(2^(b-1) - 1), 2^(b-1) - 1),  s = absmax / (2^(b-1) - 1)
* asymmetric, b bits:  q = clamp(round(w / s) + z, 0, 2^b - 1),  s = (max - min) / (2^b - 1),  z = round(-min / s)

``scale``/``zero`` have shape (out, n_groups) (or (1, 1) per tensor). ``q`` is returned unpacked in an integer
tensor; :func:`pack_int4` / :func:`unpack_int4` store two 4-bit codes per byte.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmshrink.errors import LmshrinkError


@dataclass(frozen=True)
class IntGrid:
    """An integer grid: bit width, symmetric or asymmetric, and group size along the input dimension."""

    bits: int = 8
    symmetric: bool = True
    group_size: int | None = None  # None: per output channel; 0: per tensor; k: groups of k input columns

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise LmshrinkError(f"bits must be an integer in [2, 8], got {self.bits!r}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 0):
            raise LmshrinkError(
                f"group_size must be None (per-channel), 0 (per-tensor) or > 0, got {self.group_size!r}"
            )

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1


def _grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """View (out, in) as (out, n_groups, g)."""
    if w.dim() != 2:
        raise LmshrinkError(f"expected a 2-D weight (out, in), got shape {tuple(w.shape)}")
    rows, cols = w.shape
    if group_size is None:
        return w.reshape(rows, 1, cols)
    if group_size == 0:
        return w.reshape(1, 1, rows * cols)
    if cols % group_size != 0:
        raise LmshrinkError(
            f"group size {group_size} does not divide the input dimension {cols}; use a divisor of {cols}"
        )
    return w.reshape(rows, cols // group_size, group_size)


def compute_qparams(w: torch.Tensor, grid: IntGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per group, each of shape (out, n_groups) (or (1, 1) per tensor), float32."""
    g = _grouped(w.detach().float(), grid.group_size)
    if grid.symmetric:
        absmax = g.abs().amax(dim=-1)
        scale = absmax / grid.qmax
        zero = torch.zeros_like(scale)
    else:
        lo = g.amin(dim=-1).clamp(max=0)
        hi = g.amax(dim=-1).clamp(min=0)
        scale = (hi - lo) / grid.qmax
        zero = torch.round(-lo / scale.clamp(min=1e-12))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero groups: any scale works
    return scale, zero


def compute_qparams_mse(
    w: torch.Tensor, grid: IntGrid, grid_points: int = 100, maxshrink: float = 0.8, norm: float = 2.4
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`compute_qparams` with the clipping range searched per group (the GPTQ reference's ``mse=True``).

    The range ``[min, max]`` (symmetric: ``[-absmax, absmax]``) is shrunk by ``p = 1 - i / grid_points`` for
    ``i < maxshrink * grid_points``; each group keeps the ``p`` with the least ``sum |w - deq(w)|^norm``
    (``p = 1`` is always a candidate, so the error never exceeds plain min/max).
    """
    g = _grouped(w.detach().float(), grid.group_size)
    flat = IntGrid(grid.bits, grid.symmetric, None)  # qparams per row of the (groups, g) view
    rows = g.reshape(-1, g.shape[-1])
    best_err = torch.full((rows.shape[0],), float("inf"), device=rows.device)
    best_s, best_z = compute_qparams(rows, flat)
    lo = rows.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = rows.amax(dim=-1, keepdim=True).clamp(min=0)
    for i in range(max(1, int(maxshrink * grid_points))):
        p = 1.0 - i / grid_points
        if grid.symmetric:
            amax = torch.maximum(-lo, hi) * p
            cand = torch.cat([-amax, amax], dim=-1)
        else:
            cand = torch.cat([lo * p, hi * p], dim=-1)
        s, z = compute_qparams(cand, flat)
        if grid.group_size is not None:  # grouped scales are stored in float16
            s = s.to(torch.float16).float()
        q = torch.clamp(torch.round(rows / s) + z, grid.qmin, grid.qmax)
        err = ((q - z) * s - rows).abs().pow(norm).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better[:, None], s, best_s)
        best_z = torch.where(better[:, None], z, best_z)
    return best_s.reshape(g.shape[:2]), best_z.reshape(g.shape[:2])


def _expand(p: torch.Tensor, w_shape: torch.Size, group_size: int | None) -> torch.Tensor:
    rows, cols = w_shape
    if group_size is None:
        return p.reshape(rows, 1).expand(rows, cols)
    if group_size == 0:
        return p.reshape(1, 1).expand(rows, cols)
    return p.repeat_interleave(group_size, dim=1)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: IntGrid) -> torch.Tensor:
    """Integer codes (int16 to hold every grid) of ``w`` on the grid given by ``scale``/``zero``."""
    s = _expand(scale, w.shape, grid.group_size)
    z = _expand(zero, w.shape, grid.group_size)
    q = torch.round(w.float() / s) + z
    return q.clamp_(grid.qmin, grid.qmax).to(torch.int16)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: IntGrid) -> torch.Tensor:
    """Float32 values of integer codes."""
    s = _expand(scale, q.shape, grid.group_size)
    z = _expand(zero, q.shape, grid.group_size)
    return (q.float() - z) * s


def fake_quantize(w: torch.Tensor, grid: IntGrid) -> torch.Tensor:
    """Round ``w`` onto the grid and back (same dtype and shape): the simulated quantization of RTN."""
    scale, zero = compute_qparams(w, grid)
    return dequantize_codes(quantize_codes(w, scale, zero, grid), scale, zero, grid).to(w.dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack unsigned 4-bit codes (values 0..15, last dimension even) two per byte: low nibble first."""
    if codes.shape[-1] % 2:
        raise LmshrinkError(f"int4 packing needs an even last dimension, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return (c[..., 0::2] & 0xF) | ((c[..., 1::2] & 0xF) << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 codes 0..15, last dimension doubled."""
    lo = packed & 0xF
    hi = (packed >> 4) & 0xF
    return torch.stack((lo, hi), dim=-1).flatten(-2)
