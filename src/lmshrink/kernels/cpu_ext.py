"""A small C++ extension (built once with ``torch.utils.cpp_extension.load_inline``) that fuses the element-wise
work around an int8 GEMM on CPU, which eager PyTorch does in 5-8 separate passes:

* ``quantize_rows(x)``: per-row (per-token) symmetric int8 quantization in two passes over ``x`` (row absmax, then
  ``round(x / s)``), bit-identical to ``torch.round(x / s)`` with ``s = max(absmax, 1e-12) / 127`` (float32,
  round-half-even, same IEEE operations);
* ``rescale(acc, sx, sw, bias)``: ``float(acc) * sx[m] * sw[n] (+ bias[n])`` in one pass over the int32 GEMM output,
  bit-identical to ``acc.float().mul_(sx).mul_(sw).add_(bias)``;
* ``dequant_int4_bf16(packed, scale, zero, k, qmin)``: bit-packed 4-bit codes (two per byte) to a bfloat16 weight
  ``(u + qmin - z) * s`` in one pass, for the bf16 (AMX) prefill path of int4 weight-only layers.

Rows are split over torch's intra-op threads (``at::parallel_for``). The extension needs a C++ compiler and ninja;
when either is missing, or the build fails, :func:`load` returns ``None`` and callers use the eager equivalents
(same numbers, slower). Set ``LMSHRINK_NO_CPP=1`` to force the eager path.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from typing import Any

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <immintrin.h>
#include <cstring>

static inline float row_absmax(const float* row, int64_t k) {
  const __m256 mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= k; j += 8) acc = _mm256_max_ps(acc, _mm256_and_ps(_mm256_loadu_ps(row + j), mask));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  float amax = 0.f;
  for (int l = 0; l < 8; ++l) amax = std::max(amax, lanes[l]);
  for (; j < k; ++j) amax = std::max(amax, std::fabs(row[j]));
  return amax;
}

static inline __m256i quant8(const float* p, __m256 sc, __m256 lo, __m256 hi) {
  __m256 v = _mm256_div_ps(_mm256_loadu_ps(p), sc);
  v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi));
}

std::vector<torch::Tensor> quantize_rows(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: contiguous float32 (M, K)");
  const int64_t m = x.size(0), k = x.size(1);
  auto q = torch::empty({m, k}, x.options().dtype(torch::kChar));
  auto s = torch::empty({m, 1}, x.options());
  const float* xp = x.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = s.data_ptr<float>();
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    const __m256 lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t i = begin; i < end; ++i) {
      const float* row = xp + i * k;
      const float sc = std::max(row_absmax(row, k), 1e-12f) / 127.0f;
      sp[i] = sc;
      const __m256 scv = _mm256_set1_ps(sc);
      int8_t* out = qp + i * k;
      int64_t j = 0;
      for (; j + 32 <= k; j += 32) {
        __m256i a = quant8(row + j, scv, lo, hi), b = quant8(row + j + 8, scv, lo, hi);
        __m256i c = quant8(row + j + 16, scv, lo, hi), d = quant8(row + j + 24, scv, lo, hi);
        __m256i ab = _mm256_packs_epi32(a, b), cd = _mm256_packs_epi32(c, d);
        __m256i abcd = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), perm);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), abcd);
      }
      for (; j < k; ++j) {
        float v = std::nearbyint(row[j] / sc);
        v = std::min(std::max(v, -127.f), 127.f);
        out[j] = static_cast<int8_t>(static_cast<int32_t>(v));
      }
    }
  });
  return {q, s};
}

torch::Tensor rescale(torch::Tensor acc, torch::Tensor sx, torch::Tensor sw, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(acc.dim() == 2 && acc.scalar_type() == torch::kInt && acc.is_contiguous(), "acc: contiguous int32");
  const int64_t m = acc.size(0), n = acc.size(1);
  TORCH_CHECK(sx.numel() == m && sx.scalar_type() == torch::kFloat && sx.is_contiguous(), "sx: float32 (M,)");
  TORCH_CHECK(sw.numel() == n && sw.scalar_type() == torch::kFloat && sw.is_contiguous(), "sw: float32 (N,)");
  const float* bp = nullptr;
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = *bias;
    TORCH_CHECK(b.numel() == n && b.scalar_type() == torch::kFloat && b.is_contiguous(), "bias: float32 (N,)");
    bp = b.data_ptr<float>();
  }
  auto y = torch::empty({m, n}, acc.options().dtype(torch::kFloat));
  const int32_t* ap = acc.data_ptr<int32_t>();
  const float* sxp = sx.data_ptr<float>();
  const float* swp = sw.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float r = sxp[i];
      const int32_t* a = ap + i * n;
      float* o = yp + i * n;
      if (bp) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) o[j] = static_cast<float>(a[j]) * r * swp[j] + bp[j];
      } else {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) o[j] = static_cast<float>(a[j]) * r * swp[j];
      }
    }
  });
  return y;
}

// Dequantize bit-packed 4-bit codes (two per byte, low nibble first) to bfloat16: w = (u + qmin - z) * s per group.
torch::Tensor dequant_int4_bf16(torch::Tensor packed, torch::Tensor scale, c10::optional<torch::Tensor> zero,
                                int64_t k, int64_t qmin) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == torch::kByte && packed.is_contiguous(), "packed: uint8");
  const int64_t n = packed.size(0), kb = packed.size(1);
  TORCH_CHECK(kb * 2 >= k, "packed too narrow");
  auto sc = scale.to(torch::kFloat).contiguous();
  TORCH_CHECK(sc.dim() == 2 && sc.size(0) == n && k % sc.size(1) == 0, "scale: (N, G)");
  const int64_t groups = sc.size(1), gsz = k / groups;
  torch::Tensor zf;
  const float* zp = nullptr;
  if (zero.has_value() && zero->defined()) {
    zf = zero->to(torch::kFloat).contiguous();
    TORCH_CHECK(zf.sizes() == sc.sizes(), "zero: (N, G)");
    zp = zf.data_ptr<float>();
  }
  auto out = torch::empty({n, k}, packed.options().dtype(torch::kBFloat16));
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* sp = sc.data_ptr<float>();
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint8_t* row = pp + r * kb;
      uint16_t* o = op + r * k;
      for (int64_t g = 0; g < groups; ++g) {
        const float s = sp[r * groups + g];
        const float off = static_cast<float>(qmin) - (zp ? zp[r * groups + g] : 0.f);
        const int64_t j0 = g * gsz;
#pragma omp simd
        for (int64_t j = j0; j < j0 + gsz; ++j) {
          const uint8_t byte = row[j >> 1];
          const float u = static_cast<float>((j & 1) ? (byte >> 4) : (byte & 15));
          const float w = (u + off) * s;
          uint32_t bits;
          std::memcpy(&bits, &w, 4);
          bits += 0x7FFFu + ((bits >> 16) & 1u);  // round to nearest even
          o[j] = static_cast<uint16_t>(bits >> 16);
        }
      }
    }
  });
  return out;
}
"""
#: Bump when the source changes (part of the build directory name).
_VERSION = 3


@functools.lru_cache(maxsize=1)
def load() -> Any | None:
    """The compiled module (``quantize_rows``, ``rescale``), or ``None`` when it cannot be built here."""
    if os.environ.get("LMSHRINK_NO_CPP"):
        return None
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        log.info("no C++ compiler: fused int8 CPU helpers unavailable, using eager PyTorch")
        return None
    try:
        from torch.utils import cpp_extension

        cpp_extension.verify_ninja_availability()
        return cpp_extension.load_inline(
            name=f"lmshrink_cpu_int8_v{_VERSION}",
            cpp_sources=[_SOURCE],
            functions=["quantize_rows", "rescale", "dequant_int4_bf16"],
            # AVX2 + FMA: the baseline of every CPU the int8 kernels run on (fbgemm needs AVX2 too);
            # -ffp-contract=off (no FMA contraction) and no -ffast-math keep IEEE results identical to eager PyTorch.
            extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp", "-fno-math-errno", "-ffp-contract=off"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # no ninja, a failed build: fall back, never fail the forward pass
        log.warning("fused int8 CPU helpers could not be built (%s); using eager PyTorch", exc)
        return None
