"""Low-precision kernels: CPU (fbgemm int8, per-token dynamic activations) and CUDA (int8, FP8, int4 weight-only).

Only formats listed here run on a real low-precision kernel; everything else dequantizes on the fly and claims no
speed (``QuantLinear.kernel_name`` says which).
"""

from __future__ import annotations

#: Kernel names a :class:`lmshrink.quantization.linear.QuantLinear` may report.
KERNEL_NAMES = (
    "fbgemm-int8-dynamic-per-token",  # CPU: int8 weights per channel, int8 activations per token (AVX2 without
    # VNNI: one-row calls through the int8 GEMV with float activations, QuantLinear._w8a8_decode_gemv)
    "int8-per-token-fbgemm+amx",  # CPU with AMX-INT8: fbgemm for M < 32 rows, torch._int_mm (oneDNN AMX) above
    "fbgemm-int8-dynamic-per-token+fp32-outliers",  # CPU: LLM.int8() decomposition
    "int8-weight-only-cpu-bf16",  # CPU with AMX/AVX512-BF16: _weight_int8pack_mm (few rows) / bf16 AMX GEMM
    "int4-weight-only-cpu-bf16",  # CPU with AMX/AVX512-BF16: _weight_int4pack_mm_for_cpu / decode to bf16 + AMX
    "int8-weight-only-cpu-avx2",  # CPU with AVX2+FMA: fp32-activation GEMV (few rows) / dequantize + F.linear
    "int4-weight-only-cpu-avx2",  # CPU with AVX2+FMA: fp32-activation GEMV (few rows) / dequantize + F.linear
    "nf4-weight-only-cpu-avx2",  # CPU with AVX2+FMA: the 4-bit GEMV with the NF4 codebook in registers
    "cuda-int8-mm",  # CUDA: torch._int_mm, column-major weight
    "cuda-int4-weight-only",  # CUDA: torch._weight_int4pack_mm
    "cuda-fp8-scaled-mm",  # CUDA: torch._scaled_mm
    "dequantize-on-the-fly",  # no low-precision kernel: decode weights to float every call (no speed claim)
)
