"""CUDA low-precision kernels: int8 ``torch._int_mm``, FP8 ``torch._scaled_mm``, int4 weight-only tinygemm.

Facts from the issue (H100): ``_int_mm`` is fast only with a column-major int8 weight (``W[N, K].t()``) and fails for
M <= 16; FP8 ``_scaled_mm`` pays off at large M; int4 weight-only (``_weight_int4pack_mm``) helps batch-1 decode.
The GEMM functions require CUDA (callers check :func:`cuda_available` and fall back to dequantize-on-the-fly); the
layout helpers (:func:`fp8_quantize_rows`, :func:`fp8_weight_rowwise`, :func:`tinygemm_scales_and_zeros`) run
anywhere, so their arithmetic is tested on CPU too.
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


FP8_MAX = 448.0  # largest finite float8_e4m3fn value
FP8_ROW_MULTIPLE = 16  # _scaled_mm operands: rows padded to a multiple of 16


def fp8_weight_rowwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float ``weight`` (N, K) as e4m3 values of ``weight / scale`` with one float32 scale per output row.

    Returns ``(w8 (N, K) float8_e4m3fn, scale (1, N) float32)``, the operands of :func:`fp8_linear_cuda`.
    """
    ws = weight.float().abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX
    w8 = (weight.float() / ws[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return w8.contiguous(), ws.reshape(1, -1).contiguous()


def fp8_quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row (per-token) e4m3 quantization of ``x`` (M, K): ``(x8, scale (M, 1) float32)`` with
    ``x ~= x8 * scale``. Runs on any device."""
    xs = x.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (x.float() / xs).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), xs


def fp8_linear_cuda(
    x: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """FP8 (e4m3) W8A8 GEMM, row-wise scaled: dynamic per-token scales for ``x`` (M, K), per-channel ``w_scale``
    (1, N) for ``w8`` (N, K); bf16 accumulate-and-scale output (``torch._scaled_mm``, compute capability 8.9+)."""
    m = x.shape[0]
    x8, xs = fp8_quantize_rows(x)
    pad = -m % FP8_ROW_MULTIPLE
    if pad:
        x8 = torch.cat([x8, x8.new_zeros(pad, x8.shape[1])])
        xs = torch.cat([xs, xs.new_ones(pad, 1)])
    y = torch._scaled_mm(x8, w8.t(), scale_a=xs, scale_b=w_scale, out_dtype=torch.bfloat16)[:m]
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def tinygemm_scales_and_zeros(scale: torch.Tensor, zero_u4: torch.Tensor) -> torch.Tensor:
    """tinygemm's (G, N, 2) bf16 ``scales_and_zeros`` for unsigned codes ``q`` whose value is ``(q - z) * scale``.

    tinygemm dequantizes ``(q - 8) * scale + zero_f``, so ``zero_f = (8 - z) * scale``. Runs on any device.
    """
    zf = (8.0 - zero_u4.float()) * scale.float()
    return torch.stack([scale.float(), zf], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)


def pack_int4_tinygemm(
    codes_u4: torch.Tensor,
    scale: torch.Tensor,
    zero_u4: torch.Tensor,
    group_size: int,
    inner_k_tiles: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert unsigned 4-bit codes (N, K) with value ``(q - zero) * scale``, scales and integer zero points
    (N, G) to tinygemm's layout. Returns ``(packed_weight, scales_and_zeros)`` for :func:`int4_linear_cuda`."""
    c = codes_u4.to(torch.int32)
    byte = ((c[:, ::2] << 4) | c[:, 1::2]).to(torch.uint8)  # high nibble first
    packed = torch.ops.aten._convert_weight_to_int4pack(byte.contiguous(), inner_k_tiles)
    return packed, tinygemm_scales_and_zeros(scale, zero_u4)


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
    return y if y.dtype == x.dtype else y.to(x.dtype)
