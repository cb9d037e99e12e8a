// Row-wise float math that the fused decoder (fused_decode.cpp) and the eager layers' ops (rowwise.cpp) share:
// RMSNorm and the gated activations. One copy, so a prompt row computed by the eager layers and a decode row
// computed by the fused stack normalise and gate their values in the same order, to the same bits.
#pragma once
#include <cmath>
#include <cstdint>

#include "vmath.h"

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y = x / sqrt(mean(x^2) + eps) * w, in F.rms_norm's order of operations.
inline void rms_norm(const float* x, const float* w, int64_t n, float eps, float* y) {
  const float r = 1.f / std::sqrt(dot(x, x, n) / static_cast<float>(n) + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = (x[i] * r) * w[i];
}

enum class Act { Silu, GeluTanh };

// a[i] = act(g[i]) * u[i] for i < n. SiLU: g / (1 + e^-g). GELU (tanh approximation): g / 2 (1 + tanh(y)),
// y = sqrt(2/pi) (g + 0.044715 g^3), computed as g / (1 + e^-2y): the same function ((1 + tanh y) / 2 =
// sigmoid(2y)) through the same exp as SiLU, with no tanh to evaluate.
inline void gated_act_row(Act act, const float* g, const float* u, int64_t n, float* a) {
  const bool gelu = act == Act::GeluTanh;
  // -2y = g (c1 + c3 g^2)
  constexpr float c1 = -1.5957691216057308f, c3 = -0.07135481627260025f;
  int64_t i = 0;
#if JISU_VMATH_AVX2
  // Explicit lanes: `omp simd` left exp_clamped scalar here (5.2 us per layer for 1536 inputs; this measured
  // 0.15 ms less per 30-layer decode step, the same bits).
  const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f);
  if (gelu) {
    const __m256 v1 = _mm256_set1_ps(c1), v3 = _mm256_set1_ps(c3);
    for (; i + 8 <= n; i += 8) {
      const __m256 gv = _mm256_loadu_ps(g + i);
      const __m256 e = exp_clamped8(_mm256_mul_ps(gv, _mm256_fmadd_ps(_mm256_mul_ps(gv, gv), v3, v1)));
      _mm256_storeu_ps(a + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
    }
  } else {
    for (; i + 8 <= n; i += 8) {
      const __m256 gv = _mm256_loadu_ps(g + i);
      const __m256 e = exp_clamped8(_mm256_xor_ps(gv, sign));
      _mm256_storeu_ps(a + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
    }
  }
#endif
  if (gelu)
    for (; i < n; ++i) a[i] = g[i] / (1.f + exp_clamped(g[i] * (g[i] * g[i] * c3 + c1))) * u[i];
  else
    for (; i < n; ++i) a[i] = g[i] / (1.f + exp_clamped(-g[i])) * u[i];
}
