// AVX2 helpers shared by the kernels (included only where __AVX2__ is defined), with AVX-512 VNNI forms where the
// build has it.
#pragma once
#include <immintrin.h>

// The sum of a vector's 8 lanes: halves, then pairs, then the last two.
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
  return _mm_cvtss_f32(s);
}

// The int32 sums of two 16-lane int16 products, lane i: w0[2i] x0[2i] + w0[2i+1] x0[2i+1] + the same for w1, x1.
// With AVX-512 VNNI (256-bit form, AVX-512VL) vpdpwssd adds the second pair's products into the first's in one
// instruction. Both forms add modulo 2^32 (vpdpwssd does not saturate), so they give the same integers.
inline __m256i madd16_pair(__m256i w0, __m256i x0, __m256i w1, __m256i x1) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpwssd_epi32(_mm256_madd_epi16(w0, x0), w1, x1);
#else
  return _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1));
#endif
}

// The int32 sums of unsigned bytes times signed bytes for two 32-lane pairs, lane i: the products of bytes 4i..4i+3
// of u0 and x0 and of u1 and x1. The AVX2 form sums pairs in int16 (vpmaddubsw) and then by 4 (vpmaddwd by ones);
// it needs every pair sum of the two inputs together below 2^15, which int4 weights (u <= 15) times int8 x
// (|x| <= 127) keep: then vpdpbusd's integers are the same.
inline __m256i dot_u8s8_pair(__m256i u0, __m256i x0, __m256i u1, __m256i x1) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), u0, x0), u1, x1);
#else
  const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(u0, x0), _mm256_maddubs_epi16(u1, x1));
  return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
#endif
}
