// Float math shared by the attention kernels (fused_decode.cpp, prefill_attention.cpp): KV cache elements as
// float32, and e^x / tanh on 8 lanes. One copy, so decode and prefill attention round their softmax the same way.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

// A KV cache element as float32 (the cache holds float, c10::Half or c10::BFloat16; each widens exactly).
inline float kv_float(float x) { return x; }
inline float kv_float(c10::Half x) { return static_cast<float>(x); }
inline float kv_float(c10::BFloat16 x) { return static_cast<float>(x); }

// e^x, within 1.2 ulp of the exact value for x in [-87.3, 88.3] (measured over 4M points; inputs are clamped
// there: smaller gives ~1e-38 instead of 0, which no sum here can tell apart). Written branch-free so `omp simd`
// loops vectorise it.
// x = n ln2 + r with |r| <= ln2/2 (ln2 split in two so n ln2 is exact); e^r by its degree-7 Taylor
// polynomial (truncation < 1e-8 relative); 2^n built in the exponent bits.
inline float exp_clamped(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round(x / ln2)
  float r = x - n * 0.693145751953125f;
  r = r - n * 1.428606820309417232e-6f;
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define JISU_VMATH_AVX2 1
#include "simd.h"

// 8 cache elements as float32 lanes (float16: F16C's conversion, exact).
inline __m256 load_kv8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load_kv8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
// bfloat16 is the top half of a float32: widen each 16-bit lane and shift it into place.
inline __m256 load_kv8(const c10::BFloat16* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

// e^x on 8 lanes, the same steps as exp_clamped.
inline __m256 exp_clamped8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 big = _mm256_set1_ps(12582912.f);
  const __m256 n = _mm256_sub_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), big), big);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606820309417232e-6f), r);
  __m256 p = _mm256_set1_ps(1.f / 5040.f);
  for (const float c : {1.f / 720.f, 1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f})
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// tanh on 8 lanes (the attention softcap), within 1.3 ulp (torch's: 1 ulp). |z| < 0.625: z + z t q(t), t = z^2,
// q a degree-4 fit of (tanh z / z - 1) / t (0.87 ulp in float32 over [0, 0.625]); beyond: 1 - 2 / (e^2|z| + 1),
// which loses under a bit to cancellation there (1.26 ulp with a correctly rounded exp); the sign is z's.
inline __m256 tanh8(__m256 z) {
  const __m256 sign = _mm256_set1_ps(-0.f), one = _mm256_set1_ps(1.f);
  const __m256 a = _mm256_andnot_ps(sign, z);
  const __m256 t = _mm256_mul_ps(z, z);
  __m256 q = _mm256_set1_ps(-0.006096930243074894f);
  for (const float c : {0.020997347310185432f, -0.05385095253586769f, 0.13332770764827728f, -0.333333283662796f})
    q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(c));
  const __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(z, t), q, z);
  const __m256 e = exp_clamped8(_mm256_add_ps(a, a));
  const __m256 big = _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.f), _mm256_add_ps(e, one)));
  const __m256 signed_big = _mm256_or_ps(big, _mm256_and_ps(sign, z));
  return _mm256_blendv_ps(signed_big, small, _mm256_cmp_ps(a, _mm256_set1_ps(0.625f), _CMP_LT_OQ));
}

inline float hmax8(__m256 v) {
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps(h, h, 1)));
}
#else
#define JISU_VMATH_AVX2 0
#endif

// s[0:n] <- cap * tanh(s) (Gemma 2's softcap; the scores were scaled by scale / cap), for decode and prefill
// attention alike. The vector form's tail goes through a padded block of lanes, so every score takes the same
// arithmetic wherever its chunk splits.
inline void softcap_scores(float* s, int64_t n, float cap) {
  int64_t j = 0;
#if JISU_VMATH_AVX2
  const __m256 c = _mm256_set1_ps(cap);
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(s + j, _mm256_mul_ps(c, tanh8(_mm256_loadu_ps(s + j))));
  if (j < n) {
    alignas(32) float tail[8] = {};
    std::memcpy(tail, s + j, (n - j) * sizeof(float));
    _mm256_store_ps(tail, _mm256_mul_ps(c, tanh8(_mm256_load_ps(tail))));
    std::memcpy(s + j, tail, (n - j) * sizeof(float));
  }
#else
  for (; j < n; ++j) s[j] = cap * std::tanh(s[j]);
#endif
}
