"""A small C++ extension (built once with ``torch.utils.cpp_extension.load_inline``) that fuses the element-wise
work around an int8 GEMM on CPU, which eager PyTorch does in 5-8 separate passes:

* ``quantize_rows(x)``: per-row (per-token) symmetric int8 quantization in two passes over ``x`` (row absmax, then
  ``round(x / s)``), bit-identical to ``torch.round(x / s)`` with ``s = max(absmax, 1e-12) / 127`` (float32,
  round-half-even, same IEEE operations);
* ``rescale(acc, sx, sw, bias)``: ``float(acc) * sx[m] * sw[n] (+ bias[n])`` in one pass over the int32 GEMM output,
  bit-identical to ``acc.float().mul_(sx).mul_(sw).add_(bias)``;
* ``dequant_int4_bf16(packed, scale, zero, k, qmin)``: bit-packed 4-bit codes (two per byte) to a bfloat16 weight
  ``(u + qmin - z) * s`` in one pass, for the bf16 (AMX) prefill path of int4 weight-only layers;
* ``int8_wo_gemv(x, q, scale, bias)`` / ``int4_wo_gemv(x, packed, scale, off, bias, lut)``: weight-only linear
  layers for few rows (decode) with float32 activations on AVX2 + FMA: the int8 / 4-bit codes are read once, widened
  to float32 in registers (4-bit codes through a 16-entry codebook ``lut`` for NF4) and multiplied with FMA, so a
  decode step reads 1/4 (int8) or ~1/7 (4-bit g64) of the fp32 weight bytes;
* ``dequant_4bit_f32`` / ``dequant_int8_f32``: the float32 weight in one pass for the many-rows (prefill) path of
  the same layers, bit-identical to ``QuantLinear.dequantize_weight``.
  Summation order differs from ``F.linear`` on the dequantized weight (float32 rounding, ~1e-6 relative).

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
// ---- weight-only GEMV with float32 activations (AVX2 + FMA): decode-time linear layers -------------------------
static inline float hsum256(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  __m128 sh = _mm_movehdup_ps(lo);
  __m128 s = _mm_add_ps(lo, sh);
  sh = _mm_movehl_ps(sh, s);
  return _mm_cvtss_f32(_mm_add_ss(s, sh));
}

static inline __m256 load_i8_ps(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// y[m, n] = scale[n] * sum_k x[m, k] * q[n, k] (+ bias[n]) for MB rows of x, U x 8 lanes of k per step.
template <int MB, int U>
static void int8_wo_block(const float* xp, int64_t k, const int8_t* qp, const float* sp, const float* bp,
                          float* yp, int64_t ldy, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w = qp + n * k;
    __m256 acc[MB][U];
    for (int m = 0; m < MB; ++m)
      for (int u = 0; u < U; ++u) acc[m][u] = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 * U <= k; j += 8 * U) {
      __m256 wv[U];
      for (int u = 0; u < U; ++u) wv[u] = load_i8_ps(w + j + 8 * u);
      for (int m = 0; m < MB; ++m)
        for (int u = 0; u < U; ++u)
          acc[m][u] = _mm256_fmadd_ps(wv[u], _mm256_loadu_ps(xp + m * k + j + 8 * u), acc[m][u]);
    }
    for (int m = 0; m < MB; ++m) {
      __m256 t = acc[m][0];
      for (int u = 1; u < U; ++u) t = _mm256_add_ps(t, acc[m][u]);
      float s = hsum256(t);
      for (int64_t jj = j; jj < k; ++jj) s += xp[m * k + jj] * static_cast<float>(w[jj]);
      float v = s * sp[n];
      if (bp) v += bp[n];
      yp[m * ldy + n] = v;
    }
  }
}

static void check_bias(const c10::optional<torch::Tensor>& bias, int64_t n, torch::Tensor& b, const float*& bp) {
  bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    b = *bias;
    TORCH_CHECK(b.numel() == n && b.scalar_type() == torch::kFloat && b.is_contiguous(), "bias: float32 (N,)");
    bp = b.data_ptr<float>();
  }
}

// x (M, K) float32, q (N, K) int8 codes, scale (N,) float32 -> (M, N) float32. Rows of x in blocks of <= 8.
torch::Tensor int8_wo_gemv(torch::Tensor x, torch::Tensor q, torch::Tensor scale, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: contiguous float32 (M, K)");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kChar && q.is_contiguous(), "q: contiguous int8 (N, K)");
  const int64_t m = x.size(0), k = x.size(1), n = q.size(0);
  TORCH_CHECK(q.size(1) == k, "q: (N, K) with K = x.size(1)");
  TORCH_CHECK(scale.numel() == n && scale.scalar_type() == torch::kFloat && scale.is_contiguous(), "scale: (N,)");
  torch::Tensor b;
  const float* bp;
  check_bias(bias, n, b, bp);
  auto y = torch::empty({m, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, n, 32, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < m;) {
      const int64_t left = m - m0;
      const float* xb = xp + m0 * k;
      float* yb = yp + m0 * n;
      if (left >= 8) { int8_wo_block<8, 1>(xb, k, qp, sp, bp, yb, n, n0, n1); m0 += 8; }
      else if (left >= 4) { int8_wo_block<4, 2>(xb, k, qp, sp, bp, yb, n, n0, n1); m0 += 4; }
      else if (left >= 2) { int8_wo_block<2, 4>(xb, k, qp, sp, bp, yb, n, n0, n1); m0 += 2; }
      else { int8_wo_block<1, 4>(xb, k, qp, sp, bp, yb, n, n0, n1); m0 += 1; }
    }
  });
  return y;
}

// Group-wise 4-bit codes u (two per byte, low nibble first), w = (u + off[n, g]) * s[n, g] with off = qmin - zero:
// sum_k x_k w_k = sum_g s_g * (sum_{k in g} x_k u_k + off_g * sum_{k in g} x_k). xperm holds x with every 16-wide
// chunk reordered to (even k, odd k) so the low and high nibbles of 8 bytes meet their activations without shuffles.
// With LUT (NF4 and other 16-entry codebooks) the code u stands for lut[u] instead of u: two 8-wide permutes and a
// blend look it up in registers.
static inline __m256 lut16(__m256i idx, __m256 lut0, __m256 lut1, __m256i seven) {
  const __m256 a = _mm256_permutevar8x32_ps(lut0, idx), b = _mm256_permutevar8x32_ps(lut1, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, seven)));
}

template <int MB, bool LUT>
static void int4_wo_block(const float* xperm, const float* xgsum, int64_t k, int64_t groups, int64_t gsz,
                          const uint8_t* pp, int64_t kb, const float* sp, const float* op, const float* bp,
                          const float* lut, float* yp, int64_t ldy, int64_t n0, int64_t n1) {
  const __m256i nib = _mm256_set1_epi32(15), seven = _mm256_set1_epi32(7);
  __m256 lut0 = _mm256_setzero_ps(), lut1 = _mm256_setzero_ps();
  if (LUT) { lut0 = _mm256_loadu_ps(lut); lut1 = _mm256_loadu_ps(lut + 8); }
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = pp + n * kb;
    __m256 tot[MB];
    float ctot[MB];
    for (int m = 0; m < MB; ++m) { tot[m] = _mm256_setzero_ps(); ctot[m] = 0.f; }
    for (int64_t g = 0; g < groups; ++g) {
      __m256 ga[MB][2];
      for (int m = 0; m < MB; ++m) { ga[m][0] = _mm256_setzero_ps(); ga[m][1] = _mm256_setzero_ps(); }
      const int64_t j0 = g * gsz;
      for (int64_t j = j0; j < j0 + gsz; j += 16) {
        const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + (j >> 1))));
        const __m256i ilo = _mm256_and_si256(b, nib), ihi = _mm256_srli_epi32(b, 4);
        const __m256 lo = LUT ? lut16(ilo, lut0, lut1, seven) : _mm256_cvtepi32_ps(ilo);
        const __m256 hi = LUT ? lut16(ihi, lut0, lut1, seven) : _mm256_cvtepi32_ps(ihi);
        for (int m = 0; m < MB; ++m) {
          ga[m][0] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xperm + m * k + j), ga[m][0]);
          ga[m][1] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xperm + m * k + j + 8), ga[m][1]);
        }
      }
      const float s = sp[n * groups + g], so = s * op[n * groups + g];
      const __m256 sv = _mm256_set1_ps(s);
      for (int m = 0; m < MB; ++m) {
        tot[m] = _mm256_fmadd_ps(sv, _mm256_add_ps(ga[m][0], ga[m][1]), tot[m]);
        ctot[m] += so * xgsum[m * groups + g];
      }
    }
    for (int m = 0; m < MB; ++m) {
      float v = hsum256(tot[m]) + ctot[m];
      if (bp) v += bp[n];
      yp[m * ldy + n] = v;
    }
  }
}

// x (M, K) float32; packed (N, K/2) uint8; scale, off (N, G) float32 -> (M, N) float32. K and K/G multiples of 16.
torch::Tensor int4_wo_gemv(torch::Tensor x, torch::Tensor packed, torch::Tensor scale, torch::Tensor off,
                           c10::optional<torch::Tensor> bias, c10::optional<torch::Tensor> lut) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: contiguous float32 (M, K)");
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == torch::kByte && packed.is_contiguous(), "packed: uint8");
  const int64_t m = x.size(0), k = x.size(1), n = packed.size(0), kb = packed.size(1);
  TORCH_CHECK(kb * 2 == k, "packed: (N, K/2)");
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == n && scale.scalar_type() == torch::kFloat &&
              scale.is_contiguous(), "scale: float32 (N, G)");
  TORCH_CHECK(off.sizes() == scale.sizes() && off.scalar_type() == torch::kFloat && off.is_contiguous(),
              "off: float32 (N, G)");
  const int64_t groups = scale.size(1);
  TORCH_CHECK(k % groups == 0 && (k / groups) % 16 == 0, "group size: a multiple of 16 dividing K");
  const int64_t gsz = k / groups;
  torch::Tensor b;
  const float* bp;
  check_bias(bias, n, b, bp);
  const float* lp = nullptr;
  if (lut.has_value() && lut->defined()) {
    TORCH_CHECK(lut->numel() == 16 && lut->scalar_type() == torch::kFloat && lut->is_contiguous(), "lut: float32 (16,)");
    lp = lut->data_ptr<float>();
  }
  // (even, odd) reorder of every 16-wide chunk, and per-group sums of x
  auto xperm = torch::empty({m, k}, x.options());
  auto xgsum = torch::empty({m, groups}, x.options());
  const float* xp = x.data_ptr<float>();
  float* xq = xperm.data_ptr<float>();
  float* xs = xgsum.data_ptr<float>();
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < k; j += 16)
      for (int t = 0; t < 8; ++t) {
        xq[i * k + j + t] = xp[i * k + j + 2 * t];
        xq[i * k + j + 8 + t] = xp[i * k + j + 2 * t + 1];
      }
    for (int64_t g = 0; g < groups; ++g) {
      float s = 0.f;
      for (int64_t j = g * gsz; j < (g + 1) * gsz; ++j) s += xp[i * k + j];
      xs[i * groups + g] = s;
    }
  }
  auto y = torch::empty({m, n}, x.options());
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* opp = off.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, n, 32, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < m;) {
      const int64_t left = m - m0;
      const float* xb = xq + m0 * k;
      const float* gb = xs + m0 * groups;
      float* yb = yp + m0 * n;
      const int mb = left >= 4 ? 4 : (left >= 2 ? 2 : 1);
      if (lp) {
        if (mb == 4) int4_wo_block<4, true>(xb, gb, k, groups, gsz, pp, kb, sp, opp, bp, lp, yb, n, n0, n1);
        else if (mb == 2) int4_wo_block<2, true>(xb, gb, k, groups, gsz, pp, kb, sp, opp, bp, lp, yb, n, n0, n1);
        else int4_wo_block<1, true>(xb, gb, k, groups, gsz, pp, kb, sp, opp, bp, lp, yb, n, n0, n1);
      } else {
        if (mb == 4) int4_wo_block<4, false>(xb, gb, k, groups, gsz, pp, kb, sp, opp, bp, lp, yb, n, n0, n1);
        else if (mb == 2) int4_wo_block<2, false>(xb, gb, k, groups, gsz, pp, kb, sp, opp, bp, lp, yb, n, n0, n1);
        else int4_wo_block<1, false>(xb, gb, k, groups, gsz, pp, kb, sp, opp, bp, lp, yb, n, n0, n1);
      }
      m0 += mb;
    }
  });
  return y;
}

// Float32 weights from packed codes in one pass (the many-rows path of the weight-only layers): bit-identical to
// QuantLinear.dequantize_weight ((u + off) * s, or (lut[u] + off) * s; int8: q * s).
torch::Tensor dequant_4bit_f32(torch::Tensor packed, torch::Tensor scale, torch::Tensor off,
                               c10::optional<torch::Tensor> lut) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == torch::kByte && packed.is_contiguous(), "packed: uint8");
  const int64_t n = packed.size(0), kb = packed.size(1), k = 2 * kb;
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == n && scale.scalar_type() == torch::kFloat &&
              scale.is_contiguous() && k % scale.size(1) == 0 && (k / scale.size(1)) % 2 == 0,
              "scale: float32 (N, G), even groups");
  TORCH_CHECK(off.sizes() == scale.sizes() && off.scalar_type() == torch::kFloat && off.is_contiguous(), "off");
  float table[16];
  for (int i = 0; i < 16; ++i) table[i] = static_cast<float>(i);
  if (lut.has_value() && lut->defined()) {
    TORCH_CHECK(lut->numel() == 16 && lut->scalar_type() == torch::kFloat && lut->is_contiguous(), "lut: float32 (16,)");
    std::memcpy(table, lut->data_ptr<float>(), sizeof(table));
  }
  const int64_t groups = scale.size(1), gsz = k / groups;
  auto out = torch::empty({n, k}, scale.options());
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* opp = off.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint8_t* row = pp + r * kb;
      float* orow = o + r * k;
      for (int64_t g = 0; g < groups; ++g) {
        const float sc = sp[r * groups + g], of = opp[r * groups + g];
        for (int64_t j = g * gsz / 2; j < (g + 1) * gsz / 2; ++j) {
          const uint8_t b = row[j];
          orow[2 * j] = (table[b & 15] + of) * sc;
          orow[2 * j + 1] = (table[b >> 4] + of) * sc;
        }
      }
    }
  });
  return out;
}

torch::Tensor dequant_int8_f32(torch::Tensor q, torch::Tensor scale) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kChar && q.is_contiguous(), "q: contiguous int8 (N, K)");
  const int64_t n = q.size(0), k = q.size(1);
  TORCH_CHECK(scale.numel() == n && scale.scalar_type() == torch::kFloat && scale.is_contiguous(), "scale: (N,)");
  auto out = torch::empty({n, k}, scale.options());
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float sc = sp[r];
#pragma omp simd
      for (int64_t j = 0; j < k; ++j) o[r * k + j] = static_cast<float>(qp[r * k + j]) * sc;
    }
  });
  return out;
}
"""
#: Bump when the source changes (part of the build directory name).
_VERSION = 6


@functools.lru_cache(maxsize=1)
def load() -> Any | None:
    """The compiled module (the functions above), or ``None`` when it cannot be built here."""
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
            functions=[
                "quantize_rows",
                "rescale",
                "dequant_int4_bf16",
                "int8_wo_gemv",
                "int4_wo_gemv",
                "dequant_4bit_f32",
                "dequant_int8_f32",
            ],
            # AVX2 + FMA: the baseline of every CPU the int8 kernels run on (fbgemm needs AVX2 too);
            # -ffp-contract=off (no FMA contraction) and no -ffast-math keep IEEE results identical to eager PyTorch.
            extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp", "-fno-math-errno", "-ffp-contract=off"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # no ninja, a failed build: fall back, never fail the forward pass
        log.warning("fused int8 CPU helpers could not be built (%s); using eager PyTorch", exc)
        return None
