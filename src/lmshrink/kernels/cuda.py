"""CUDA low-precision kernels: int8 ``torch._int_mm``, FP8 ``torch._scaled_mm``, int4 weight-only tinygemm.

Facts from the issue (H100): ``_int_mm`` is fast only with a column-major int8 weight (``W[N, K].t()``) and fails for
M <= 16; FP8 ``_scaled_mm`` pays off at large M; int4 weight-only (``_weight_int4pack_mm``) helps batch-1 decode.
Every function here requires CUDA; callers check :func:`cuda_available` and fall back to dequantize-on-the-fly.
"""

from __future__ import annotations

import torch


def cuda_available() -> bool:
    """True when a CUDA device is usable."""
    return torch.cuda.is_available()


def int8_linear_cuda(
    x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """W8A8 on CUDA: per-token int8 ``x`` (M, K) times int8 ``qweight`` (N, K) with per-channel ``w_scale`` (N,).

    ``qweight.t()`` is the column-major (K, N) operand ``_int_mm`` wants. M <= 16 is padded to 17 rows.
    """
    m = x.shape[0]
    xs = x.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0  # (M, 1)
    xq = torch.round(x.float() / xs).clamp_(-127, 127).to(torch.int8)
    if m <= 16:
        xq = torch.cat([xq, xq.new_zeros(17 - m, xq.shape[1])])
    acc = torch._int_mm(xq, qweight.t())[:m]  # (M, N) int32
    y = acc.float() * xs * w_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def fp8_linear_cuda(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """FP8 (e4m3) GEMM with a per-tensor scale for ``x`` (M, K) and ``weight`` (N, K), bf16 output."""
    fmax = torch.finfo(torch.float8_e4m3fn).max
    xs = (x.float().abs().amax().clamp(min=1e-12) / fmax).reshape(1, 1)
    ws = (weight.float().abs().amax().clamp(min=1e-12) / fmax).reshape(1, 1)
    x8 = (x.float() / xs).to(torch.float8_e4m3fn)
    w8 = (weight.float() / ws).to(torch.float8_e4m3fn)
    y = torch._scaled_mm(x8, w8.t(), scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype)


def pack_int4_tinygemm(
    codes_u4: torch.Tensor,
    scale: torch.Tensor,
    zero_u4: torch.Tensor,
    group_size: int,
    inner_k_tiles: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert unsigned 4-bit codes (N, K), scales and integer zero points (N, G) to tinygemm's layout.

    tinygemm dequantizes ``(q - 8) * scale + zero_f`` with a float zero, so ``zero_f = (8 - z) * scale``.
    Returns ``(packed_weight, scales_and_zeros)`` for :func:`int4_linear_cuda`.
    """
    c = codes_u4.to(torch.int32)
    byte = ((c[:, ::2] << 4) | c[:, 1::2]).to(torch.uint8)  # high nibble first
    packed = torch.ops.aten._convert_weight_to_int4pack(byte.contiguous(), inner_k_tiles)
    zf = (8.0 - zero_u4.float()) * scale.float()
    sz = torch.stack([scale.float(), zf], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # (G, N, 2)
    return packed, sz


def int4_linear_cuda(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales_and_zeros: torch.Tensor,
    group_size: int,
    out_features: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weight-only int4 GEMM (tinygemm) for bf16 ``x`` (M, K)."""
    y = torch.ops.aten._weight_int4pack_mm(
        x.to(torch.bfloat16).contiguous(), packed, group_size, scales_and_zeros
    )
    y = y[:, :out_features]
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype)
