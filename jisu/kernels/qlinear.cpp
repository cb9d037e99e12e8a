// CPU kernels for QWeight (formats in qlinear.h): matrix-vector products for decode and small batches
// (qweight_matvec), tiled GEMM for long prefills (qlinear with more than 128 / 192 rows), dequantization.
//
// Why: at batch 1 decode reads every weight once per token, and int4 weights are 8x fewer bytes than float32, so
// the kernels never materialise float32 weights. Two forms: (a) by default (QWeight::act_bits 16) x is rounded
// once per call to int16 per 32-input block and nibbles / bytes widen to int16 for integer dot products (vpmaddwd,
// ~2.3 cycles per 32 int4 weights and thread on AVX2; the avx512 set's vpdpwssd gives the same integer sums); (b)
// with act_bits 32, float32 x, weights converted to float in registers right before the FMAs (~6 cycles), which
// was compute-bound at 2 threads. The loops are shaped by counted instructions and by how the hardware prefetcher
// follows them (numbers next to each choice;
// benchmarks/bench_qlinear.py).
//
// Order of the sums (what a result's bits depend on). Each (m, n) is computed in one fixed order, whatever M, the
// thread split or the number of rows processed side by side are, so a sequence gets the same numbers alone or in
// a batch (tests/test_qlinear_kernels.py checks it bit for bit). Inputs go in 8-lane slices (inputs 8i..8i+7):
//   float32:     slice i is FMA'd into chain i % 4 (i in order); y = hsum8((c0 + c1) + (c2 + c3)), then the
//                K % 8 leftover inputs one FMA at a time, then + bias. (The old linear_cpu.cpp kernel's order.)
//   int8 / int4 with act_bits 16: see "16-bit activations" below (int8) and "int4 row quads" (int4).
//   int8 / int4 with act_bits 32: per group g, in order: S = the group's slices FMA'd into one chain (q * x, q the
//                exact integer as float), T = fma(scale_g, S, T); y = hsum8(T) [int4: + sum_g zero_g * X_g], + bias,
//                where X_g is the sum of x over group g (computed once per call) and the zero term is 8 groups at
//                a time (FMA), hsum8, then the leftover groups one FMA at a time.
//   outlier columns (any of the above): y += (the fma chain over them in order, from 0), after the bias.
// That is sum_g scale_g * sum_k q_k x_k + zero_g * sum_k x_k = x . dequantize(w) up to float32 rounding. The
// dequantized matrix itself (qweight_dequantize, the prefill GEMM) is exact: scale * q is exact in float32 (an
// 11-bit mantissa times a <= 8-bit integer), so scale * q + zero rounds once, as torch's float32 arithmetic does.
//
// Measured alternative (one thread, cache-resident int4 576x576 group 32, cycles per 32 weights): dequantizing in
// registers first (w = scale * q + zero, then FMA with x: 4 more FMAs per 32 weights) took 7.4 with one row and
// 8.5 with two (register spills), against 7.2 / 6.6 / 6.1 for 1 / 2 / 4 rows with the group sums above.
#include "qlinear.h"
#include "int4_quads.h"
#include "qlinear_amx.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define JISU_QLINEAR_VEC 1
#include "simd.h"
#else
#define JISU_QLINEAR_VEC 0
#endif

namespace {

// int4 rows, scales and zeros (the constructor's inputs, qlinear.h) -> row quads.
at::Tensor pack_int4_quads(const at::Tensor& q, const at::Tensor& scales, const at::Tensor& zeros, int64_t G) {
  const int64_t N = q.size(0), K = q.size(1) * 2;
  const Int4Quads layout(K, G);
  at::Tensor out = at::zeros({(N + 3) / 4, layout.quad_bytes()}, at::kByte);
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const at::Half *sp = scales.data_ptr<at::Half>(), *zp = zeros.data_ptr<at::Half>();
  uint8_t* op = out.data_ptr<uint8_t>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      uint8_t* quad = op + (n / 4) * layout.quad_bytes();
      const int64_t r = n % 4, ng = layout.ng, nbg = layout.nbg;
      for (int64_t g = 0; g < ng; ++g) {
        for (int64_t i = 0; i < nbg; ++i)
          std::memcpy(quad + layout.block_at(g, i, r), qp + n * (K / 2) + (g * nbg + i) * Int4Quads::kRowBytes,
                      Int4Quads::kRowBytes);
        auto* halves = reinterpret_cast<at::Half*>(quad + layout.halves_at(g));
        halves[r] = sp[n * ng + g];
        halves[4 + r] = zp[n * ng + g];
      }
    }
  });
  return out;
}

}  // namespace

QWeight::QWeight(int64_t bits_, at::Tensor data_, c10::optional<at::Tensor> scales_, c10::optional<at::Tensor> zeros_,
                 int64_t group_, c10::optional<at::Tensor> bias_, c10::optional<at::Tensor> outlier_cols_,
                 c10::optional<at::Tensor> outlier_weights_)
    : bits(bits_), group(group_) {
  TORCH_CHECK(bits == 32 || bits == 8 || bits == 4, "bits must be 32, 8 or 4, got ", bits);
  TORCH_CHECK(data_.defined() && data_.dim() == 2 && data_.device().is_cpu(),
              "weight data must be a 2-D CPU tensor [N, K] (bits 4: [N, K/2]), got ",
              data_.defined() ? data_.sizes() : at::IntArrayRef{});
  data = data_.contiguous();
  N = data.size(0);
  if (bits == 32) {
    TORCH_CHECK(data.scalar_type() == at::kFloat, "bits 32 needs float32 data, got ", data.scalar_type());
    K = data.size(1);
    group = K;
  } else {
    K = bits == 8 ? data.size(1) : data.size(1) * 2;
    TORCH_CHECK(data.scalar_type() == (bits == 8 ? at::kChar : at::kByte), "bits ", bits, " needs ",
                bits == 8 ? "int8" : "uint8", " data, got ", data.scalar_type());
    TORCH_CHECK(group > 0 && K % group == 0, "group size ", group, " does not divide ", K, " inputs");
    TORCH_CHECK(bits == 8 || group % 32 == 0, "int4 group size must be a multiple of 32, got ", group);
    TORCH_CHECK(scales_.has_value() && scales_->defined(), "bits ", bits, " needs scales");
    scales = scales_->contiguous();
    TORCH_CHECK(scales.device().is_cpu() && scales.scalar_type() == at::kHalf && scales.dim() == 2 &&
                    scales.size(0) == N && scales.size(1) == K / group,
                "scales must be float16 [", N, ", ", K / group, "] on CPU, got ", scales.scalar_type(), " ",
                scales.sizes());
    if (bits == 4) {
      TORCH_CHECK(zeros_.has_value() && zeros_->defined(), "int4 needs zeros");
      zeros = zeros_->contiguous();
      TORCH_CHECK(zeros.device().is_cpu() && zeros.scalar_type() == at::kHalf && zeros.sizes() == scales.sizes(),
                  "zeros must be float16 shaped like scales [", N, ", ", K / group, "], got ", zeros.scalar_type(),
                  " ", zeros.sizes());
      data = pack_int4_quads(data, scales, zeros, group);
      scales = at::Tensor();
      zeros = at::Tensor();
    }
  }
  if (bias_.has_value() && bias_->defined()) {
    bias = bias_->contiguous();
    TORCH_CHECK(bias.device().is_cpu() && bias.scalar_type() == at::kFloat && bias.numel() == N,
                "bias must be float32 [", N, "] on CPU, got ", bias.scalar_type(), " ", bias.sizes());
  }
  const bool has_cols = outlier_cols_.has_value() && outlier_cols_->defined();
  const bool has_weights = outlier_weights_.has_value() && outlier_weights_->defined();
  TORCH_CHECK(has_cols == has_weights, "outlier_cols and outlier_weights come together");
  if (has_cols) {
    TORCH_CHECK(bits == 8, "only int8 weights take outlier columns, got bits ", bits);
    outlier_cols = outlier_cols_->contiguous();
    const int64_t C = outlier_cols.numel();
    TORCH_CHECK(outlier_cols.device().is_cpu() && outlier_cols.scalar_type() == at::kLong && outlier_cols.dim() == 1,
                "outlier_cols must be int64 [C] on CPU, got ", outlier_cols.scalar_type(), " ", outlier_cols.sizes());
    const at::Tensor& ow = *outlier_weights_;
    TORCH_CHECK(ow.device().is_cpu() && ow.scalar_type() == at::kHalf && ow.dim() == 2 && ow.size(0) == N &&
                    ow.size(1) == C,
                "outlier_weights must be float16 [", N, ", ", C, "] on CPU, got ", ow.scalar_type(), " ", ow.sizes());
    // Held as row octets [ceil(N/8), C, 8] (padded with zeros): 8 output rows' weights of one column in one
    // 16-byte load, each thread's rows one stream. Measured (SmolLM2's 120 int8 per-channel matrices, 8 columns,
    // 2 threads, median of 40 alternations, a noisy machine): 1.02-1.09x the pass without columns; float32 in
    // [C, N] (C streams, twice the bytes) 1.05-1.10x. Software prefetch of the octets made no clear difference.
    outlier_weights = at::zeros({(N + 7) / 8 * 8, C}, ow.options());
    outlier_weights.narrow(0, 0, N).copy_(ow);
    outlier_weights = outlier_weights.view({(N + 7) / 8, 8, C}).transpose(1, 2).contiguous();
    const int64_t* c = outlier_cols.data_ptr<int64_t>();
    for (int64_t j = 0; j < C; ++j) {
      TORCH_CHECK(c[j] >= 0 && c[j] < K, "outlier column ", c[j], " is not in [0, ", K, ")");
      for (int64_t i = 0; i < j; ++i) TORCH_CHECK(c[i] != c[j], "outlier column ", c[j], " is given twice");
    }
  }
}

int64_t QWeight::nbytes() const {
  int64_t n = data.nbytes();
  if (scales.defined()) n += scales.nbytes();
  if (zeros.defined()) n += zeros.nbytes();
  if (bias.defined()) n += bias.nbytes();
  if (outlier_cols.defined()) n += outlier_cols.nbytes() + outlier_weights.nbytes();
  return n;
}

namespace {

// Per-thread scratch, reused across calls (the fused decoder makes ~120 calls per token; no allocation in them).
struct Scratch {
  std::vector<float> row, sc, zc, out;  // used inside parallel tasks
  std::vector<int16_t> row16;           // used inside parallel tasks
  std::vector<float> xs, xd;            // used by the calling thread before its parallel_for
  std::vector<int16_t> xq;              // used by the calling thread before its parallel_for
  std::vector<int8_t> xq8;              // used by the calling thread before its parallel_for
  std::vector<uint16_t> xa;             // used by the calling thread before its parallel_for
};
Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

// n float16 values as float32 (exact).
inline void halves_to_float(const at::Half* src, int64_t n, float* out) {
  int64_t i = 0;
#if JISU_QLINEAR_VEC
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) out[i] = static_cast<float>(src[i]);
}

// Row n of the blocks as float32 into out[K] (outlier columns read 0); sc/zc: scratch of >= K/group floats.
void dequantize_blocks_row(const QWeight& w, int64_t n, float* out, float* sc, float* zc) {
  const int64_t K = w.K, G = w.group;
  if (w.bits == 32) {
    std::memcpy(out, w.data.data_ptr<float>() + n * K, K * sizeof(float));
    return;
  }
  const int64_t ng = K / G;
  if (w.bits == 8) {
    halves_to_float(w.scales.data_ptr<at::Half>() + n * ng, ng, sc);
    const int8_t* q = w.data.data_ptr<int8_t>() + n * K;
#if JISU_QLINEAR_VEC
    if (G % 8 == 0) {
      for (int64_t g = 0; g < ng; ++g) {
        const __m256 s = _mm256_broadcast_ss(sc + g);
        for (int64_t k = g * G; k < (g + 1) * G; k += 8) {
          const __m256i qi = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + k)));
          _mm256_storeu_ps(out + k, _mm256_mul_ps(s, _mm256_cvtepi32_ps(qi)));
        }
      }
      return;
    }
#endif
    for (int64_t g = 0; g < ng; ++g)
      for (int64_t k = g * G; k < (g + 1) * G; ++k) out[k] = sc[g] * static_cast<float>(q[k]);
    return;
  }
  const Int4Quads quads(w);
  quads.row_scales(n, sc, zc);
#if JISU_QLINEAR_VEC
  const __m256i lo4 = _mm256_set1_epi32(0xF);
  for (int64_t g = 0; g < ng; ++g) {
    const __m256 s = _mm256_broadcast_ss(sc + g), z = _mm256_broadcast_ss(zc + g);
    for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
      const uint8_t* qb = quads.block(n, k / 32);
      const __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qb)));
      const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qb + 8)));
      _mm256_storeu_ps(out + k, _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(_mm256_and_si256(a, lo4)), z));
      _mm256_storeu_ps(out + k + 8, _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(_mm256_and_si256(b, lo4)), z));
      _mm256_storeu_ps(out + k + 16, _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4)), z));
      _mm256_storeu_ps(out + k + 24, _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), z));
    }
  }
#else
  for (int64_t b = 0; b < K / 32; ++b) {
    const float s = sc[b * 32 / G], z = zc[b * 32 / G];
    const uint8_t* qb = quads.block(n, b);
    for (int64_t j = 0; j < 16; ++j) {
      const uint8_t byte = qb[j];
      out[b * 32 + j] = s * static_cast<float>(byte & 0xF) + z;  // s * q is exact: one rounding, as fma
      out[b * 32 + j + 16] = s * static_cast<float>(byte >> 4) + z;
    }
  }
#endif
}

// Row n of W as float32 into out[K], outlier columns included.
void dequantize_row(const QWeight& w, int64_t n, float* out, float* sc, float* zc) {
  dequantize_blocks_row(w, n, out, sc, zc);
  if (!w.outlier_cols.defined()) return;
  const int64_t C = w.outlier_cols.numel();
  const int64_t* c = w.outlier_cols.data_ptr<int64_t>();
  const at::Half* ow = w.outlier_weights.data_ptr<at::Half>() + (n / 8) * C * 8 + n % 8;
  for (int64_t j = 0; j < C; ++j) out[c[j]] = static_cast<float>(ow[j * 8]);
}

// Bytes ahead of a weight stream that its kernels prefetch (measured for int4 quads, see act16_quad_rows).
constexpr int64_t kPrefetchAhead = 4096;

#if JISU_QLINEAR_VEC
// R octets of output rows (8 rows each, starting at o, the first octet's C columns of 8 halves) against one row
// of x: y[8r + l] += the fma chain of lane l over the columns in order. Each lane's chain is the same for any R;
// R > 1 runs R independent chains side by side to hide the FMA latency one chain waits on. Measured with 64
// columns (SmolLM2 int8 per channel, `jisu bench compare`, 3 runs), R = 4 against 1: a 128-token prefill 306 ->
// 369 tok/s (8 columns: 441 / 410), 16 concurrent 119 -> 127 (131 / 140).
template <int R>
inline void outlier_octets(const __m128i* o, int64_t C, const int64_t* c, const float* xm, float* y) {
  __m256 t[R];
  for (int r = 0; r < R; ++r) t[r] = _mm256_setzero_ps();
  // One line kPrefetchAhead bytes on per column: at R = 4 that keeps pace with the 64 bytes a column reads
  // (prefetch does not fault, so reading past the matrix's end is harmless). Measured (SmolLM2's 120 int8 per
  // channel matrices streamed, 64 columns, 16 interleaved passes against the same weights without columns, three
  // runs): the columns cost 1.33-1.60 -> 0.78-0.89 ms per 30-layer pass at M = 1; unchanged at M = 16.
  const char* ahead = reinterpret_cast<const char*>(o) + kPrefetchAhead;
  for (int64_t j = 0; j < C; ++j) {
    _mm_prefetch(ahead + 64 * j, _MM_HINT_T0);
    const __m256 xj = _mm256_set1_ps(xm[c[j]]);
    for (int r = 0; r < R; ++r) t[r] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(o + r * C + j)), xj, t[r]);
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(y + 8 * r, _mm256_add_ps(_mm256_loadu_ps(y + 8 * r), t[r]));
}
#endif

// y[m, n] += t, t = the fma chain over the outlier columns j in order (from 0), for output rows [n0, n1): the
// same order in every lane, so the result depends on neither M nor the thread split.
void add_outlier_columns(const QWeight& w, const float* x, int64_t M, float* y, int64_t n0, int64_t n1) {
  if (!w.outlier_cols.defined()) return;
  const int64_t C = w.outlier_cols.numel(), N = w.N, K = w.K;
  const int64_t* c = w.outlier_cols.data_ptr<int64_t>();
  const at::Half* ow = w.outlier_weights.data_ptr<at::Half>();
  auto one = [&](const float* xm, float* ym, int64_t n) {
    const at::Half* o = ow + (n / 8) * C * 8 + n % 8;
    float t = 0.f;
    for (int64_t j = 0; j < C; ++j) t = std::fma(static_cast<float>(o[j * 8]), xm[c[j]], t);
    ym[n] += t;
  };
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    float* ym = y + m * N;
    int64_t n = n0;
#if JISU_QLINEAR_VEC
    for (; n < n1 && n % 8; ++n) one(xm, ym, n);
    // Four octets side by side where they fit: see outlier_octets.
    for (; n + 32 <= n1; n += 32) outlier_octets<4>(reinterpret_cast<const __m128i*>(ow + n * C), C, c, xm, ym + n);
    for (; n + 8 <= n1; n += 8) outlier_octets<1>(reinterpret_cast<const __m128i*>(ow + n * C), C, c, xm, ym + n);
#endif
    for (; n < n1; ++n) one(xm, ym, n);
  }
}

#if JISU_QLINEAR_VEC

// A loaded value the compiler must keep in a register: without this GCC folds the load into every FMA that uses
// it (one load per use), and the tiles below become load-bound.
inline __m256 in_register(__m256 v) {
  __asm__("" : "+x"(v));
  return v;
}

// (Accumulator arrays are only ever indexed with compile-time constants and passed by value: otherwise GCC keeps
// them in memory and stores every accumulator after every FMA.)
inline __m256 sum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  return _mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, d));
}

// Scalar form of the canonical order for int8 groups that are not a multiple of 8 inputs (never produced by
// jisu's quantizers; kept correct, not fast): S_g sequential, then T += s_g * S_g sequential.
inline void scalar_rows(const QWeight& w, int64_t n, const float* x, int64_t M, float* y, int64_t N, float b,
                        float* sc) {
  const int64_t K = w.K, G = w.group, ng = K / G;
  halves_to_float(w.scales.data_ptr<at::Half>() + n * ng, ng, sc);
  const int8_t* q = w.data.data_ptr<int8_t>() + n * K;
  for (int64_t m = 0; m < M; ++m) {
    float t = 0.f;
    for (int64_t g = 0; g < ng; ++g) {
      float sg = 0.f;
      for (int64_t k = g * G; k < (g + 1) * G; ++k) sg = std::fma(static_cast<float>(q[k]), x[m * K + k], sg);
      t = std::fma(sc[g], sg, t);
    }
    y[m * N] = t + b;
  }
}

// ---- float32: 4 chains over the whole row (the old linear_cpu.cpp kernel's order) ----

// NB consecutive float32 weight rows (stride K) against one row of x: out[i] = dot(x, w[i]), 4 chains each.
// NB = 1 at M = 1 (one sequential stream, bandwidth-bound); NB = 3 at M > 1, where each x load (from L2 once
// x[M, K] outgrows L1) feeds 3 FMAs. Measured (2 threads, SmolLM2 float32, M = 16, ms per pass): the old
// linear_cpu.cpp kernel (1 x 1) 67, 1 weight row x 3 x rows 70, 3 weight rows x 1 x row 55.
template <int NB>
inline void f32_rows(const float* w, int64_t K, const float* x, float* out) {
  __m256 c[NB][4];
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < 4; ++j) c[i][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    for (int j = 0; j < 4; ++j) {
      const __m256 xv = in_register(_mm256_loadu_ps(x + k + 8 * j));
      for (int i = 0; i < NB; ++i) c[i][j] = _mm256_fmadd_ps(_mm256_loadu_ps(w + i * K + k + 8 * j), xv, c[i][j]);
    }
  }
  for (int j = 0; k + 8 <= K; k += 8, ++j) {  // j < 3: fewer than 32 inputs are left
    const __m256 xv = _mm256_loadu_ps(x + k);
    for (int i = 0; i < NB; ++i) c[i][j] = _mm256_fmadd_ps(_mm256_loadu_ps(w + i * K + k), xv, c[i][j]);
  }
  for (int i = 0; i < NB; ++i) {
    float s = hsum8(sum4(c[i][0], c[i][1], c[i][2], c[i][3]));
    for (int64_t t = k; t < K; ++t) s = std::fma(w[i * K + t], x[t], s);
    out[i] = s;
  }
}

// Up to this many rows of x read the weights directly, one row of x after another over the same few weight rows
// (they stay in L1 after the first); more rows take the tiled forms: several float32 weight rows side by side, or
// int8 weights widened to int16 once first. Those cost more than they saved at few rows. (int4 with 16-bit
// activations no longer switches: it takes rows of x 4 at a time at every M, int4_quads_task.) Measured (2 threads):
// - SmolLM2 int4 with its Q8_0 output layer, decode tok/s of all sequences together: 2 sequences 207 -> 303 (one
//   alone: ~240), 4: 276 -> 326; the output layer at 2 rows 1.42 -> 1.10 ms.
// - cache-hot int4 3072x576, cycles per (block, row of x): M = 2 5.5 -> 3.4, 4 4.4 -> 3.4, 8 and 16 the same
//   either way (~3.1); streamed from memory at 16 rows widening measured 6% faster.
// - float32, 40 distinct 3072x576 matrices streamed, ms: M = 2 14.6 -> 7.4, 3 14.6 -> 7.6, 4 15.2 -> 9.7,
//   6 17.5 -> 15.8, 8 19.6 -> 25.0 (there the tiles win).
// Either way the sums are the same, bit for bit.
constexpr int64_t kDirectRows = 4;

// Output rows [n0, n1) of a float32 matvec. (noinline: inlined into the OpenMP region, GCC keeps the
// accumulators in memory and stores each one after every FMA.)
__attribute__((noinline)) void f32_task(const float* wp, const float* x, int64_t M, int64_t K, float* y, int64_t N,
                                        const float* bp, int64_t n0, int64_t n1) {
  float r[3];
  if (M <= kDirectRows) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t m = 0; m < M; ++m) {
        f32_rows<1>(wp + n * K, K, x + m * K, r);
        y[m * N + n] = r[0] + (bp ? bp[n] : 0.f);
      }
    return;
  }
  int64_t n = n0;
  for (; n + 3 <= n1; n += 3)
    for (int64_t m = 0; m < M; ++m) {
      f32_rows<3>(wp + n * K, K, x + m * K, r);
      for (int i = 0; i < 3; ++i) y[m * N + n + i] = r[i] + (bp ? bp[n + i] : 0.f);
    }
  for (; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      f32_rows<1>(wp + n * K, K, x + m * K, r);
      y[m * N + n] = r[0] + (bp ? bp[n] : 0.f);
    }
}

// ---- int8 / int4: per group S_g = sum q*x (one chain), T = fma(scale_g, S_g, T) ----

// One 32-input block as 4 float vectors of exact integers q: inputs 0-7, 8-15, 16-23, 24-31. The M = 1 kernels
// unpack in registers; the M > 1 kernels unpack a row once into a float buffer.
struct Int8Block {
  using T = int8_t;
  static constexpr int64_t kBytes = 32;
  static inline void unpack(const int8_t* p, __m256* v) {
    for (int j = 0; j < 4; ++j)
      v[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * j))));
  }
};
// Byte j of a block holds inputs j (low nibble) and j + 16 (high nibble): zero-extending bytes 0..7 to 32-bit
// lanes gives inputs 0..7 (& 0xF) and 16..23 (>> 4) with no shuffles; bytes 8..15 give 8..15 and 24..31.
struct Int4Block {
  using T = uint8_t;
  static constexpr int64_t kBytes = 16;
  static inline void unpack(const uint8_t* p, __m256* v) {
    const __m256i lo4 = _mm256_set1_epi32(0xF);
    const __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8)));
    v[0] = _mm256_cvtepi32_ps(_mm256_and_si256(a, lo4));
    v[1] = _mm256_cvtepi32_ps(_mm256_and_si256(b, lo4));
    v[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4));
    v[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
  }
};

// M = 1: NR weight rows (row r at q + r * row_stride; from one block to the next block_step bytes, plus group_skip
// after a group's last; scales at sc + r * ng) against x, unpacked in registers;
// out[r] = hsum8(T_r) (no zero term, no bias). group % 32 == 0; GB = blocks per group when known at compile time.
// One chain per group and row is short (G / 8 FMAs); NR rows side by side give the core independent chains, and
// each x load feeds NR rows. Measured (one thread, cache-resident int4 576x576 group 32, cycles per 32 weights):
// NR 1 / 2 / 4 = 7.1 / 6.6 / 6.1; 2 or 4 chains per group with fewer rows were no faster.
template <class B, int NR, int GB>
inline void group_rows_m1(const typename B::T* q, int64_t row_stride, int64_t block_step, int64_t group_skip,
                          const float* sc, int64_t ng, int64_t G, const float* x, float* out) {
  __m256 t[NR];
  for (int r = 0; r < NR; ++r) t[r] = _mm256_setzero_ps();
  const int64_t nb = GB > 0 ? GB : G / 32;
  const typename B::T* qb = q;
  const float* xb = x;
  for (int64_t g = 0; g < ng; ++g) {
    __m256 a[NR];
    for (int r = 0; r < NR; ++r) a[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b, qb += block_step, xb += 32) {
      const __m256 x0 = _mm256_loadu_ps(xb), x1 = _mm256_loadu_ps(xb + 8);
      const __m256 x2 = _mm256_loadu_ps(xb + 16), x3 = _mm256_loadu_ps(xb + 24);
      for (int r = 0; r < NR; ++r) {
        __m256 v[4];
        B::unpack(qb + r * row_stride, v);
        a[r] = _mm256_fmadd_ps(v[0], x0, a[r]);
        a[r] = _mm256_fmadd_ps(v[1], x1, a[r]);
        a[r] = _mm256_fmadd_ps(v[2], x2, a[r]);
        a[r] = _mm256_fmadd_ps(v[3], x3, a[r]);
      }
    }
    qb += group_skip;
    for (int r = 0; r < NR; ++r) t[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(sc + r * ng + g), a[r], t[r]);
  }
  for (int r = 0; r < NR; ++r) out[r] = hsum8(t[r]);
}

// Weight rows side by side at M = 1 (see quant_task; int4 takes its row quads).
constexpr int kM1Rows = 4;

template <class B, int NR>
inline void group_rows_m1_any(const typename B::T* q, int64_t row_stride, int64_t block_step, int64_t group_skip,
                              const float* sc, int64_t ng, int64_t G, const float* x, float* out) {
  if (G == 32) group_rows_m1<B, NR, 1>(q, row_stride, block_step, group_skip, sc, ng, G, x, out);
  else group_rows_m1<B, NR, 0>(q, row_stride, block_step, group_skip, sc, ng, G, x, out);
}

// M > 1: a tile of NB weight rows unpacked to floats (row i at qf + i * K, exact integers; scales at sc + i * ng)
// against R rows of x (stride ldx); out[r * NB + i] = hsum8(T). The same order as group_rows_m1 (slices of 8 in
// order into one chain per group). G % 8 == 0. NB x R accumulators and as many T's stay in registers; each x load
// feeds NB FMAs and each weight load R.
template <int NB, int R, int G32>
inline void group_tile(const float* qf, int64_t K, const float* sc, int64_t ng, int64_t G_, const float* x,
                       int64_t ldx, float* out) {
  const int64_t G = G32 ? 32 : G_;
  __m256 t[NB][R];
  for (int i = 0; i < NB; ++i)
    for (int r = 0; r < R; ++r) t[i][r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    __m256 a[NB][R];
    for (int i = 0; i < NB; ++i)
      for (int r = 0; r < R; ++r) a[i][r] = _mm256_setzero_ps();
    const int64_t k0 = g * G;
    for (int64_t k = k0; k < k0 + G; k += 8) {
      __m256 xv[R];
      for (int r = 0; r < R; ++r) xv[r] = in_register(_mm256_loadu_ps(x + r * ldx + k));
      for (int i = 0; i < NB; ++i) {
        const __m256 qv = in_register(_mm256_loadu_ps(qf + i * K + k));
        for (int r = 0; r < R; ++r) a[i][r] = _mm256_fmadd_ps(qv, xv[r], a[i][r]);
      }
    }
    for (int i = 0; i < NB; ++i) {
      const __m256 s = _mm256_broadcast_ss(sc + i * ng + g);
      for (int r = 0; r < R; ++r) t[i][r] = _mm256_fmadd_ps(s, a[i][r], t[i][r]);
    }
  }
  for (int i = 0; i < NB; ++i)
    for (int r = 0; r < R; ++r) out[r * NB + i] = hsum8(t[i][r]);
}

// Weight rows per tile and x rows per pass. Measured (int4 group 32, SmolLM2's layer shapes, one thread, cached,
// M = 16): 3 x 2 = 55.7 ms per 30 layers, 2 x 3 = 59.1; before in_register (loads folded into FMAs) 3 x 2 = 65.3.
constexpr int kTileRows = 3;
constexpr int kRowsPerPass = 2;

// All M rows of x against nb (<= kTileRows) unpacked weight rows; out[m * nb + i].
template <int NB, int G32>
void group_tile_all(const float* qf, int64_t K, const float* sc, int64_t ng, int64_t G, const float* x, int64_t M,
                    float* out) {
  int64_t m = 0;
  for (; m + kRowsPerPass <= M; m += kRowsPerPass)
    group_tile<NB, kRowsPerPass, G32>(qf, K, sc, ng, G, x + m * K, K, out + m * NB);
  for (; m < M; ++m) group_tile<NB, 1, G32>(qf, K, sc, ng, G, x + m * K, K, out + m * NB);
}

template <int NB>
void group_tile_all_any(const float* qf, int64_t K, const float* sc, int64_t ng, int64_t G, const float* x,
                        int64_t M, float* out) {
  if (G == 32) group_tile_all<NB, 1>(qf, K, sc, ng, G, x, M, out);
  else group_tile_all<NB, 0>(qf, K, sc, ng, G, x, M, out);
}

// Zero-point term of one (m, n): sum_g zero_g * X_g, X_g = the sum of x[m] over group g (per call).
inline float zero_term(const float* z, const float* xs, int64_t ng) {
  __m256 acc = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= ng; g += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(z + g), _mm256_loadu_ps(xs + g), acc);
  float s = hsum8(acc);
  for (; g < ng; ++g) s = std::fma(z[g], xs[g], s);
  return s;
}

// X_g for every row of x: 8 lanes summed over the group's slices in order, then hsum8.
void group_sums(const float* x, int64_t M, int64_t K, int64_t G, float* xs) {
  const int64_t ng = K / G;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < ng; ++g) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t k = g * G; k < (g + 1) * G; k += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(x + m * K + k));
      xs[m * ng + g] = hsum8(acc);
    }
}

// This thread's float scratch for the scales and zeros of `rows` weight rows (ng groups each).
struct RowScratch {
  float *sc, *zc;
  RowScratch(int64_t rows, int64_t ng) {
    Scratch& s = scratch();
    if (static_cast<int64_t>(s.sc.size()) < rows * ng) s.sc.resize(rows * ng), s.zc.resize(rows * ng);
    sc = s.sc.data();
    zc = s.zc.data();
  }
};

// How a task finds row n's blocks and scales: int8 rows of w.data and w.scales; int4 row quads.
template <class B>
struct RowAccess;
template <>
struct RowAccess<Int8Block> {
  const int8_t* q;
  const at::Half* hs;
  int64_t K, ng;
  explicit RowAccess(const QWeight& w)
      : q(w.data.data_ptr<int8_t>()), hs(w.scales.data_ptr<at::Half>()), K(w.K), ng(w.K / w.group) {}
  const int8_t* block(int64_t n, int64_t b) const { return q + n * K + 32 * b; }
  void scales(int64_t n, int64_t rows, float* sc, float*) const { halves_to_float(hs + n * ng, rows * ng, sc); }
};
template <>
struct RowAccess<Int4Block> {
  Int4Quads quads;
  explicit RowAccess(const QWeight& w) : quads(w) {}
  const uint8_t* block(int64_t n, int64_t b) const { return quads.block(n, b); }
  void scales(int64_t n, int64_t rows, float* sc, float* zc) const {
    for (int64_t i = 0; i < rows; ++i) quads.row_scales(n + i, sc + i * quads.ng, zc + i * quads.ng);
  }
};

// One parallel task of a quantized matvec with float32 activations: output rows [n0, n1) (int4: whole quads,
// n1 may stop short of the last quad's padding).
template <class B>
void quant_task(const QWeight& w, const float* x, int64_t M, float* y, const float* xs, int64_t n0, int64_t n1) {
  constexpr bool int4 = std::is_same_v<B, Int4Block>;
  const int64_t N = w.N, K = w.K, G = w.group, ng = K / G;
  const RowAccess<B> rows(w);
  const RowScratch rs(std::max<int64_t>(kM1Rows, kTileRows), ng);
  float *sc = rs.sc, *zc = rs.zc;
  const float* bp = w.bias.defined() ? w.bias.data_ptr<float>() : nullptr;
  Scratch& s = scratch();
  auto finish = [&](int64_t m, int64_t n, float v, const float* z) {
    if (int4) v += zero_term(z, xs + m * ng, ng);
    y[m * N + n] = v + (bp ? bp[n] : 0.f);
  };
  if (M == 1 && G % 32 == 0) {
    // kM1Rows rows side by side. int8: row i of kM1Rows equal parts of the task's range, so that each is a plain
    // sequential stream through memory, which the hardware prefetcher follows. Measured (2 threads, SmolLM2's 30
    // layers streamed from memory, ms per pass): int8 group 32, 4 adjacent rows 9.6, 1 row 4.7, 4 rows from 4
    // parts 3.5. int4: the 4 rows of a quad, one stream. Software prefetch did not help once streams were separate.
    constexpr int NR = kM1Rows;
    float t[NR];
    if constexpr (int4) {
      for (int64_t n = n0; n < n1; n += 4) {
        const int nr = static_cast<int>(std::min<int64_t>(4, N - n));
        rows.scales(n, nr, sc, zc);
        group_rows_m1_any<B, NR>(rows.block(n, 0), Int4Quads::kRowBytes, Int4Quads::kBlockBytes,
                                 Int4Quads::kHalvesBytes, sc, ng, G, x, t);
        for (int r = 0; r < nr; ++r) finish(0, n + r, t[r], zc + r * ng);
      }
    } else {
      auto run = [&](int64_t n, int nr, int64_t stride) {  // rows n, n + stride, ..., n + (nr - 1) * stride
        for (int r = 0; r < nr; ++r) rows.scales(n + r * stride, 1, sc + r * ng, nullptr);
        if (nr == NR) group_rows_m1_any<B, NR>(rows.block(n, 0), stride * K, 32, 0, sc, ng, G, x, t);
        else group_rows_m1_any<B, 1>(rows.block(n, 0), K, 32, 0, sc, ng, G, x, t);
        for (int r = 0; r < nr; ++r) finish(0, n + r * stride, t[r], nullptr);
      };
      const int64_t part = (n1 - n0) / NR;
      for (int64_t n = n0; n < n0 + part; ++n) run(n, NR, part);
      for (int64_t n = n0 + NR * part; n < n1; ++n) run(n, 1, 1);
    }
    return;
  }
  if (static_cast<int64_t>(s.row.size()) < kTileRows * K) s.row.resize(kTileRows * K);
  if (static_cast<int64_t>(s.out.size()) < kTileRows * M) s.out.resize(kTileRows * M);
  float* qf = s.row.data();
  float* tm = s.out.data();
  for (int64_t n = n0; n < n1; n += kTileRows) {
    const int nb = static_cast<int>(std::min<int64_t>(kTileRows, n1 - n));
    for (int i = 0; i < nb; ++i) {
      float* qi = qf + i * K;
      for (int64_t b = 0; b < K / 32; ++b) {
        __m256 v[4];
        B::unpack(rows.block(n + i, b), v);
        for (int j = 0; j < 4; ++j) _mm256_storeu_ps(qi + 32 * b + 8 * j, v[j]);
      }
      if constexpr (!int4)
        for (int64_t k = K / 32 * 32; k < K; k += 8)  // int8 groups of 8 * odd (int4 rows are whole blocks)
          _mm256_storeu_ps(qi + k, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                       _mm_loadl_epi64(reinterpret_cast<const __m128i*>(rows.block(n + i, 0) + k)))));
    }
    rows.scales(n, nb, sc, zc);
    if (nb == 3) group_tile_all_any<3>(qf, K, sc, ng, G, x, M, tm);
    else if (nb == 2) group_tile_all_any<2>(qf, K, sc, ng, G, x, M, tm);
    else group_tile_all_any<1>(qf, K, sc, ng, G, x, M, tm);
    for (int i = 0; i < nb; ++i)
      for (int64_t m = 0; m < M; ++m) finish(m, n + i, tm[m * nb + i], zc + i * ng);
  }
}

// ---- int8 / int4 with 16-bit activations: integer dot products per 32-input block ----
//
// Converting every weight to float costs more than reading it (above: ~6 cycles per 32 int4 weights). Instead x is
// rounded once per call to int16 with one float scale per 32-input block (d_b = max|x_b| / 32767, so each input
// moves by at most max|x_b| / 65534, 2^-16 of its block's largest: far below any weight format's own error), and
// weights widen to int16 for vpmaddwd. A block's integer sum P_b = sum q * xq is exact and so is float(P_b)
// (|P_b| lane <= 4 * 128 * 32767 < 2^24). Order of the float sums, for every M: per group g, A = fma(float(P_b),
// d_b, A) over its blocks in order; T = fma(scale_g, A, T); y = hsum8(T) [int4: + the zero term from the float
// x, as above] + bias. Measured (one thread, cache-resident int4 576x576 group 32): see kAct16Rows.

// One 32-input block of x into v[0..3]; its scale for rounding onto -levels..levels into *d, and the factor that
// maps it there returned. A block holding NaN or inf gets d = NaN (factor 0), so the rows it touches come out
// NaN, as they would in float.
inline __m256 load_block_for_rounding(const float* xb, float levels, __m256* v, float* d) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 a = _mm256_setzero_ps();
  int bad = 0;
  for (int j = 0; j < 4; ++j) {
    v[j] = _mm256_loadu_ps(xb + 8 * j);
    a = _mm256_max_ps(a, _mm256_and_ps(v[j], abs_mask));
    bad |= _mm256_movemask_ps(_mm256_cmp_ps(v[j], v[j], _CMP_UNORD_Q));
  }
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 0x55));
  const float amax = _mm_cvtss_f32(h);
  const bool finite = !bad && amax <= 3.4e38f;
  *d = finite ? amax / levels : std::numeric_limits<float>::quiet_NaN();
  return _mm256_set1_ps(finite && amax > 0.f ? levels / amax : 0.f);
}

// x [M, K] (K % 32 == 0) -> xq int16 [M, K] and d float [M, K / 32].
void quantize_act16(const float* x, int64_t M, int64_t K, int16_t* xq, float* xd) {
  for (int64_t i = 0; i < M * K / 32; ++i) {
    __m256 v[4];
    const __m256 inv = load_block_for_rounding(x + 32 * i, 32767.f, v, xd + i);
    for (int j = 0; j < 2; ++j) {
      const __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(v[2 * j], inv));
      const __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(v[2 * j + 1], inv));
      // packs works per 128-bit half: [lo0-3 hi0-3 lo4-7 hi4-7] -> reorder the 64-bit quarters to 0, 2, 1, 3.
      const __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + 32 * i + 16 * j), p);
    }
  }
}

// Weight sources for the act16 kernels: one 32-input block as two int16 vectors (inputs 0-15, 16-31).
struct Int4Src {  // packed nibbles: byte j = input j (low) | input j + 16 (high)
  using T = uint8_t;
  static constexpr int64_t kStride = 16;  // elements of T per block
  static inline void load(const uint8_t* p, __m256i& w0, __m256i& w1) {
    const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    w0 = _mm256_and_si256(v, _mm256_set1_epi16(0xF));
    w1 = _mm256_srli_epi16(v, 4);
  }
};
struct Int8Src {
  using T = int8_t;
  static constexpr int64_t kStride = 32;
  static inline void load(const int8_t* p, __m256i& w0, __m256i& w1) {
    w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)));
  }
};
struct Int16Src {  // rows already widened (the M > 1 tiles)
  using T = int16_t;
  static constexpr int64_t kStride = 32;
  static inline void load(const int16_t* p, __m256i& w0, __m256i& w1) {
    w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16));
  }
};

// NR weight rows (row r at q + r * row_stride, its float scales at sc + r * ng) against one row of quantized x;
// out[r] = hsum8(T_r) (no zero term, no bias). nbg = blocks per group.
template <class S, int NR>
inline void act16_rows(const typename S::T* q, int64_t row_stride, const float* sc, int64_t ng, int64_t nbg,
                       const int16_t* xq, const float* xd, float* out) {
  __m256 t[NR];
  for (int r = 0; r < NR; ++r) t[r] = _mm256_setzero_ps();
  const typename S::T* qb = q;
  for (int64_t g = 0; g < ng; ++g) {
    __m256 a[NR];
    for (int r = 0; r < NR; ++r) a[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nbg; ++b, qb += S::kStride, xq += 32, ++xd) {
      const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
      const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 16));
      const __m256 d = _mm256_broadcast_ss(xd);
      for (int r = 0; r < NR; ++r) {
        __m256i w0, w1;
        S::load(qb + r * row_stride, w0, w1);
        const __m256i p = madd16_pair(w0, x0, w1, x1);
        a[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), d, a[r]);
      }
    }
    for (int r = 0; r < NR; ++r) t[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(sc + r * ng + g), a[r], t[r]);
  }
  for (int r = 0; r < NR; ++r) out[r] = hsum8(t[r]);
}

// Rows side by side at M = 1, each from its own part of the task's range (sequential streams, as above).
constexpr int kAct16Rows = 4;
// Weight rows per widened tile at M > 1.
constexpr int kAct16Tile = 4;

// One parallel task of an int8 act16 matvec: output rows [n0, n1).
void act16_int8_task(const QWeight& w, int64_t M, const int16_t* xq, const float* xd, float* y, int64_t n0,
                     int64_t n1) {
  using S = Int8Src;
  const int64_t N = w.N, K = w.K, ng = K / w.group, nbg = w.group / 32, nb = K / 32;
  const RowAccess<Int8Block> rows(w);
  float* sc = RowScratch(std::max(kAct16Rows, kAct16Tile), ng).sc;
  const float* bp = w.bias.defined() ? w.bias.data_ptr<float>() : nullptr;
  Scratch& s = scratch();
  auto finish = [&](int64_t m, int64_t n, float v) { y[m * N + n] = v + (bp ? bp[n] : 0.f); };
  if (M <= kDirectRows) {
    constexpr int NR = kAct16Rows;
    float t[NR];
    const int64_t part = (n1 - n0) / NR;
    for (int64_t n = n0; n < n0 + part; ++n) {
      for (int r = 0; r < NR; ++r) rows.scales(n + r * part, 1, sc + r * ng, nullptr);
      for (int64_t m = 0; m < M; ++m) {
        act16_rows<S, NR>(rows.block(n, 0), part * K, sc, ng, nbg, xq + m * K, xd + m * nb, t);
        for (int r = 0; r < NR; ++r) finish(m, n + r * part, t[r]);
      }
    }
    for (int64_t n = n0 + NR * part; n < n1; ++n) {
      rows.scales(n, 1, sc, nullptr);
      for (int64_t m = 0; m < M; ++m) {
        act16_rows<S, 1>(rows.block(n, 0), K, sc, ng, nbg, xq + m * K, xd + m * nb, t);
        finish(m, n, t[0]);
      }
    }
    return;
  }
  // M > 1: widen a tile of rows to int16 once, then every row of x against it (the same sums as M = 1). The tile
  // starts on a cache line: from a vector's 16-byte alignment every other 32-byte load would split two lines.
  if (static_cast<int64_t>(s.row16.size()) < kAct16Tile * K + 32) s.row16.resize(kAct16Tile * K + 32);
  int16_t* wt = reinterpret_cast<int16_t*>((reinterpret_cast<uintptr_t>(s.row16.data()) + 63) & ~uintptr_t{63});
  float t[kAct16Tile];
  for (int64_t n = n0; n < n1; n += kAct16Tile) {
    const int nt = static_cast<int>(std::min<int64_t>(kAct16Tile, n1 - n));
    for (int i = 0; i < nt; ++i)
      for (int64_t b = 0; b < nb; ++b) {
        __m256i w0, w1;
        S::load(rows.block(n + i, b), w0, w1);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(wt + i * K + 32 * b), w0);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(wt + i * K + 32 * b + 16), w1);
      }
    rows.scales(n, nt, sc, nullptr);
    for (int64_t m = 0; m < M; ++m) {
      const int16_t* xm = xq + m * K;
      const float* dm = xd + m * nb;
      if (nt == kAct16Tile) act16_rows<Int16Src, kAct16Tile>(wt, K, sc, ng, nbg, xm, dm, t);
      else
        for (int i = 0; i < nt; ++i) act16_rows<Int16Src, 1>(wt + i * K, K, sc + i * ng, ng, nbg, xm, dm, t + i);
      for (int i = 0; i < nt; ++i) finish(m, n + i, t[i]);
    }
  }
}

// ---- int4 row quads with 16-bit activations ----
//
// The 4 rows of a quad against one row of quantized x, reading the quad front to back. Per group g: the 4 scales
// and zeros become floats once; the zero term Z_r = fma(zero_rg, X_g, Z_r) (X_g: the sum of float x over g, per
// call). Per block b of g, each row's integer products P_r (8 int32 lanes) are summed across lanes in integers
// into one vector C = [P_0 P_1 P_2 P_3 | P_0 P_1 P_2 P_3] (lane r: the sum of P_r's lanes 0-3, lane 4 + r: of its
// lanes 4-7); a lane of C sums 16 products of a nibble and an int16 (< 2^24), so float(C) is exact too, and
// T = fma(float(C), scale_r * d_b, T) is one FMA for all 4 rows. out[r] = (T_r + T_{r+4}) + Z_r (no bias).
// Measured (one thread, quads of K = 576, reference cycles per 32 weights of a row): summing in integers instead
// of a float stage per row (convert, permute the scale, FMA: 4 a block) 4.1 -> 3.2 with the quads in cache.
// Streamed from memory the hardware prefetcher alone left it at 4.4-5.0; a software prefetch kPrefetchAhead bytes
// ahead brought it to 2.9-3.4 (tried 512, 1024, 2048, 4096 and 8192 bytes ahead: 4096 was best).
//
// Rows of x go through a quad kQuadXRows at a time: each block's nibbles are widened to int16 once (load, zero-
// extend, mask, shift) and multiplied into every one of those rows. For each row of x the instructions and their
// order are the ones it gets alone (integer sums are exact whatever their grouping, and the float steps are the
// same), so a row's bits depend neither on its neighbours nor on how many there are. Rows 0-1 of the quad are
// widened and summed for every row of x first, then rows 2-3: 4 widened vectors live instead of 8 keeps the
// accumulators of 4 rows of x in registers. This replaces reading the nibbles again for every row of x (up to 4
// rows) and, beyond 4, widening each quad into an int16 buffer first. Measured (one thread, SmolLM2's 30 layers
// streamed, CPU ms per pass, before -> after): M = 1 4.8 -> 4.5 (the same kernel), 2 8.0 -> 6.9, 3 11.9 -> 9.9,
// 4 15.7 -> 12.0, 5 22.9 -> 15.8, 8 32.6 -> 23.9, 16 55.9 -> 46.6, 64 205 -> 182.
constexpr int kQuadXRows = 4;

// Row r's i-th block of group g (block b overall) and row r + 1's as int16: w[0], w[1] row r's inputs 0-15 and
// 16-31, w[2], w[3] row r + 1's.
inline void widen_quad_pair(const uint8_t* quad, const Int4Quads& layout, int64_t g, int64_t i, int r, __m256i* w) {
  Int4Src::load(quad + layout.block_at(g, i, r), w[0], w[1]);
  Int4Src::load(quad + layout.block_at(g, i, r + 1), w[2], w[3]);
}

// The first step of C for a pair of rows (w from widen_quad_pair) against one block of x (x0: inputs 0-15, x1:
// 16-31): P_r and P_{r+1} with their lanes 2j and 2j + 1 summed, interleaved [r r+1 r r+1 | r r+1 r r+1].
inline __m256i quad_pair_products(const __m256i* w, __m256i x0, __m256i x1) {
  const __m256i pa = madd16_pair(w[0], x0, w[1], x1);
  const __m256i pb = madd16_pair(w[2], x0, w[3], x1);
  return _mm256_add_epi32(_mm256_unpacklo_epi32(pa, pb), _mm256_unpackhi_epi32(pa, pb));
}

// A quad's 4 outputs for one row of x: out[r] = (T[a_r] + T[b_r]) + Z[r], lanes[r] = {a_r, b_r} the lanes of T
// holding the two halves of row r's sum: lanes r and 4 + r in the int16 kernels ([P0 P1 P2 P3 | P0 P1 P2 P3]),
// [P0a P0b P2a P2b | P1a P1b P3a P3b] in the int8 one.
using QuadLanes = int[4][2];
constexpr QuadLanes kAct16Lanes = {{0, 4}, {1, 5}, {2, 6}, {3, 7}};
constexpr QuadLanes kAct8Lanes = {{0, 1}, {4, 5}, {2, 3}, {6, 7}};
inline void finish_quad(__m256 t, __m128 z, const QuadLanes& lanes, float* out) {
  alignas(32) float tr[8];
  _mm256_store_ps(tr, t);
  alignas(16) float zr[4];
  _mm_store_ps(zr, z);
  for (int r = 0; r < 4; ++r) out[r] = (tr[lanes[r][0]] + tr[lanes[r][1]]) + zr[r];
}

// The start of group g of a quad for MR rows of x (group sums at xs + m * ng): prefetch ahead of the stream, add
// each row's zero term (z[m] = fma(zeros, xs[m, g], z[m])), and return the 4 rows' scales as floats.
template <int MR>
inline __m128 quad_group_start(const uint8_t* quad, const Int4Quads& layout, int64_t g, const float* xs, int64_t ng,
                               __m128* z) {
  // Prefetch does not fault, so reading ahead past the last quad is harmless. Every line the group's record spans
  // (80 bytes for group 32: one line a group had left every fifth line to the hardware prefetcher). Measured
  // (SmolLM2's 30 int4 layers streamed, alternating in one process, 15 x 3 passes): 4 rows of x 7.29 -> 6.55 ms
  // at 2 threads, 13.8 -> 12.1 at one; 1 row unchanged (3.34 / 4.68 ms).
  const char* ahead = reinterpret_cast<const char*>(quad + g * layout.rec + kPrefetchAhead);
  for (int64_t off = 0; off < layout.rec; off += 64) _mm_prefetch(ahead + off, _MM_HINT_T0);
  _mm_prefetch(ahead + layout.rec - 1, _MM_HINT_T0);
  const uint8_t* halves = quad + layout.halves_at(g);
  const __m128 z4 = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(halves + 8)));
  for (int m = 0; m < MR; ++m) z[m] = _mm_fmadd_ps(z4, _mm_broadcast_ss(xs + m * ng + g), z[m]);
  return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(halves)));
}

// One quad against MR rows of x (row m's int16 inputs at xq + m * K, its block scales at xd + m * K / 32, its group
// sums at xs + m * ng); out[4 * m + r]. kNbg: blocks per group fixed at compile time (0: the layout's, at run
// time). Group 32 (GGUF Q4_0 / Q4_1) is one block a group, and the run-time loop of length 1 around it kept this
// ~1.6x slower (one thread, one large matrix streamed: 9.8 -> 12.4 GB/s with it fixed).
template <int kNbg, int MR>
inline void act16_quad_rows(const uint8_t* quad, const Int4Quads& layout, const int16_t* xq, const float* xd,
                            const float* xs, int64_t K, float* out) {
  const int64_t ng = layout.ng, nbg = kNbg ? kNbg : layout.nbg, nb = K / 32;
  __m256 t[MR];
  __m128 z[MR];
  for (int m = 0; m < MR; ++m) t[m] = _mm256_setzero_ps(), z[m] = _mm_setzero_ps();
  for (int64_t g = 0, b = 0; g < ng; ++g) {
    const __m128 s4 = quad_group_start<MR>(quad, layout, g, xs, ng, z);
    const __m256 s8 = _mm256_set_m128(s4, s4);
    for (int64_t i = 0; i < nbg; ++i, ++b) {
      __m256i w[4], p01[MR];
      widen_quad_pair(quad, layout, g, i, 0, w);
      for (int m = 0; m < MR; ++m) {
        const int16_t* xb = xq + m * K + 32 * b;
        p01[m] = quad_pair_products(w, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb)),
                                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 16)));
      }
      widen_quad_pair(quad, layout, g, i, 2, w);
      for (int m = 0; m < MR; ++m) {
        const int16_t* xb = xq + m * K + 32 * b;
        const __m256i p23 = quad_pair_products(w, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb)),
                                               _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 16)));
        const __m256i c = _mm256_add_epi32(_mm256_unpacklo_epi64(p01[m], p23), _mm256_unpackhi_epi64(p01[m], p23));
        t[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(c), _mm256_mul_ps(s8, _mm256_broadcast_ss(xd + m * nb + b)), t[m]);
      }
    }
  }
  for (int m = 0; m < MR; ++m) finish_quad(t[m], z[m], kAct16Lanes, out + 4 * m);
}

// One row of x (MR = 1, plain decode): the 4 rows' blocks widened side by side, then C in one reduction; the same
// operations as act16_quad_rows<kNbg, 1> in the same order (its two-pair form measured ~20% slower here, 4.7 ->
// 5.6-6.3 ms per 30 SmolLM2 layers at one thread).
template <int kNbg>
inline void act16_quad_one(const uint8_t* quad, const Int4Quads& layout, const int16_t* xq, const float* xd,
                           const float* xs, float* out) {
  const int64_t ng = layout.ng, nbg = kNbg ? kNbg : layout.nbg;
  __m256 t = _mm256_setzero_ps();
  __m128 z = _mm_setzero_ps();
  for (int64_t g = 0, b = 0; g < ng; ++g) {
    const __m128 s4 = quad_group_start<1>(quad, layout, g, xs, ng, &z);
    const __m256 s8 = _mm256_set_m128(s4, s4);
    for (int64_t i = 0; i < nbg; ++i, ++b) {
      const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32 * b));
      const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32 * b + 16));
      __m256i p[4];
      for (int r = 0; r < 4; ++r) {
        __m256i w0, w1;
        Int4Src::load(quad + layout.block_at(g, i, r), w0, w1);
        p[r] = madd16_pair(w0, x0, w1, x1);
      }
      const __m256i p01 = _mm256_add_epi32(_mm256_unpacklo_epi32(p[0], p[1]), _mm256_unpackhi_epi32(p[0], p[1]));
      const __m256i p23 = _mm256_add_epi32(_mm256_unpacklo_epi32(p[2], p[3]), _mm256_unpackhi_epi32(p[2], p[3]));
      const __m256i c = _mm256_add_epi32(_mm256_unpacklo_epi64(p01, p23), _mm256_unpackhi_epi64(p01, p23));
      t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(c), _mm256_mul_ps(s8, _mm256_broadcast_ss(xd + b)), t);
    }
  }
  finish_quad(t, z, kAct16Lanes, out);
}

#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
// The avx512 set's form of act16_quad_rows / act16_quad_one, 512 bits wide: the same integers and float steps per
// output, so the same bits. Two rows of a quad are one 512-bit vector: their 32 bytes of a block widen to int16
// in one vpmovzxbw ([row r's bytes | row r + 1's]), the low nibbles are inputs 0-15 and the high ones 16-31 of
// both rows, and x's inputs 0-15 and 16-31 are each broadcast to both halves; vpmaddwd + vpdpwssd then give
// [P_r | P_r+1] (the 8 int32 lanes of each row's products, as in the 256-bit form). Two adds of lane pairs fold
// [P_0 | P_1] and [P_2 | P_3] into W = per 128-bit lane k [A_k B_k A_k B_k], A_k the sum of the first product
// vector's lanes 4k..4k+3 and B_k the second's: the 256-bit C's integers (lanes 0-3 and 4-7 of each row), each
// twice. T = fma(float(W), S * d_b, T) per block with S the matching scales makes each of C's float lanes the same
// way; row r's output adds its two halves' lanes in the same order, (a + b) + Z_r. About 15 instructions per
// block and row of x against 23, and the shared widening 8 against 16.
inline __m512i quad_pair_products512(__m512i wlo, __m512i whi, __m512i xlo, __m512i xhi) {
  return _mm512_dpwssd_epi32(_mm512_madd_epi16(wlo, xlo), whi, xhi);
}
// Lanes of W holding row r's two halves (first, second): rows 0 and 2 in 128-bit lanes 0-1, rows 1 and 3 in 2-3.
constexpr QuadLanes kAct16Lanes512 = {{0, 4}, {8, 12}, {1, 5}, {9, 13}};

template <int kNbg, int MR>
inline void act16_quad_rows512(const uint8_t* quad, const Int4Quads& layout, const int16_t* xq, const float* xd,
                               const float* xs, int64_t K, float* out) {
  const int64_t ng = layout.ng, nbg = kNbg ? kNbg : layout.nbg, nb = K / 32;
  const __m512i lo4 = _mm512_set1_epi16(0xF);
  // W's lanes hold rows [0 2 0 2 | 0 2 0 2 | 1 3 1 3 | 1 3 1 3]: the scales go the same way.
  const __m512i scale_order = _mm512_setr_epi32(0, 2, 0, 2, 0, 2, 0, 2, 1, 3, 1, 3, 1, 3, 1, 3);
  __m512 t[MR];
  __m128 z[MR];
  for (int m = 0; m < MR; ++m) t[m] = _mm512_setzero_ps(), z[m] = _mm_setzero_ps();
  for (int64_t g = 0, b = 0; g < ng; ++g) {
    const __m128 s4 = quad_group_start<MR>(quad, layout, g, xs, ng, z);
    const __m512 s16 = _mm512_permutexvar_ps(scale_order, _mm512_castps128_ps512(s4));
    for (int64_t i = 0; i < nbg; ++i, ++b) {
      const uint8_t* blk = quad + layout.block_at(g, i, 0);
      const __m512i v01 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk)));
      const __m512i v23 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32)));
      const __m512i lo01 = _mm512_and_si512(v01, lo4), hi01 = _mm512_srli_epi16(v01, 4);
      const __m512i lo23 = _mm512_and_si512(v23, lo4), hi23 = _mm512_srli_epi16(v23, 4);
      for (int m = 0; m < MR; ++m) {
        const int16_t* xb = xq + m * K + 32 * b;
        const __m512i xlo = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb)));
        const __m512i xhi = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 16)));
        const __m512i pa = quad_pair_products512(lo01, hi01, xlo, xhi);
        const __m512i pb = quad_pair_products512(lo23, hi23, xlo, xhi);
        const __m512i s = _mm512_add_epi32(_mm512_unpacklo_epi32(pa, pb), _mm512_unpackhi_epi32(pa, pb));
        const __m512i w = _mm512_add_epi32(s, _mm512_shuffle_epi32(s, _MM_PERM_BADC));
        t[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(w), _mm512_mul_ps(s16, _mm512_set1_ps(xd[m * nb + b])), t[m]);
      }
    }
  }
  for (int m = 0; m < MR; ++m) {
    alignas(64) float tr[16];
    _mm512_store_ps(tr, t[m]);
    alignas(16) float zr[4];
    _mm_store_ps(zr, z[m]);
    for (int r = 0; r < 4; ++r) out[4 * m + r] = (tr[kAct16Lanes512[r][0]] + tr[kAct16Lanes512[r][1]]) + zr[r];
  }
}
#endif

// ---- int4 row quads with 8-bit activations (act_bits 8: asked for explicitly, it changes answers) ----
//
// x is rounded to int8 per 32-input block (d_b = max|x_b| / 127: each input moves by at most 1/254 of its block's
// largest, 129x what int16 allows; docs/QUANTIZATION.md has the measured quality cost) and the nibbles stay bytes,
// so one vpmaddubsw multiplies 32 nibbles by 32 inputs where int16 needs two vpmaddwd and a widening. A quad's
// block is 64 bytes, rows 0-1 in its first 32: their low nibbles are both rows' inputs 0-15 (one per 128-bit half),
// their high nibbles inputs 16-31, multiplied by x's inputs 0-15 and 16-31 broadcast to both halves. Pair sums
// (<= 2 * 15 * 127) add in int16 without saturating, vpmaddwd by ones sums them by 4 into int32; the avx512 set's
// vpdpbusd makes the same int32 lanes directly (the same integers). C = hadd(rows 0-1, rows 2-3) =
// [P0a P0b P2a P2b | P1a P1b P3a P3b], each a sum of 16 products (< 2^24, exact as float); per block
// T = fma(float(C), S * d_b, T) with S = [s0 s0 s2 s2 | s1 s1 s3 s3]; out[r] = (T_ra + T_rb) + Z_r, Z_r the zero
// term from the float group sums as in act16_quad_rows. Like act16, a row's bits depend on neither its neighbours
// nor their number: each row of x gets the same instructions in the same order. Rows of x go through a quad
// kQuadXRows at a time, as act16's.

// x [M, K] (K % 32 == 0) -> xq int8 [M, K] in -127..127 and d float [M, K / 32].
void quantize_act8(const float* x, int64_t M, int64_t K, int8_t* xq, float* xd) {
  for (int64_t i = 0; i < M * K / 32; ++i) {
    __m256 v[4];
    const __m256 inv = load_block_for_rounding(x + 32 * i, 127.f, v, xd + i);
    __m256i q[4];
    for (int j = 0; j < 4; ++j) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv));
    // packs works per 128-bit half: [0-3 8-11 | 4-7 12-15] and so on; one permute of 32-bit lanes restores order.
    const __m256i p16 = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    const __m256i p = _mm256_permutevar8x32_epi32(p16, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + 32 * i), p);
  }
}

// One quad against MR rows of x (row m's int8 inputs at xq + m * K, block scales at xd + m * K / 32, group sums at
// xs + m * ng); out[4 * m + r].
template <int kNbg, int MR>
inline void act8_quad_rows(const uint8_t* quad, const Int4Quads& layout, const int8_t* xq, const float* xd,
                           const float* xs, int64_t K, float* out) {
  const int64_t ng = layout.ng, nbg = kNbg ? kNbg : layout.nbg, nb = K / 32;
  const __m256i lo4 = _mm256_set1_epi8(0x0F);
  const __m256i order = _mm256_setr_epi32(0, 0, 2, 2, 1, 1, 3, 3);
  __m256 t[MR];
  __m128 z[MR];
  for (int m = 0; m < MR; ++m) t[m] = _mm256_setzero_ps(), z[m] = _mm_setzero_ps();
  for (int64_t g = 0, b = 0; g < ng; ++g) {
    const __m128 s4 = quad_group_start<MR>(quad, layout, g, xs, ng, z);
    const __m256 s8 = _mm256_permutevar8x32_ps(_mm256_set_m128(s4, s4), order);
    for (int64_t i = 0; i < nbg; ++i, ++b) {
      const uint8_t* blk = quad + layout.block_at(g, i, 0);
      const __m256i r01 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk));
      const __m256i r23 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32));
      const __m256i lo01 = _mm256_and_si256(r01, lo4), hi01 = _mm256_and_si256(_mm256_srli_epi16(r01, 4), lo4);
      const __m256i lo23 = _mm256_and_si256(r23, lo4), hi23 = _mm256_and_si256(_mm256_srli_epi16(r23, 4), lo4);
      for (int m = 0; m < MR; ++m) {
        const int8_t* xb = xq + m * K + 32 * b;
        const __m256i xlo = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xb)));
        const __m256i xhi = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xb + 16)));
        const __m256i c = _mm256_hadd_epi32(dot_u8s8_pair(lo01, xlo, hi01, xhi), dot_u8s8_pair(lo23, xlo, hi23, xhi));
        t[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(c), _mm256_mul_ps(s8, _mm256_broadcast_ss(xd + m * nb + b)), t[m]);
      }
    }
  }
  for (int m = 0; m < MR; ++m) finish_quad(t[m], z[m], kAct8Lanes, out + 4 * m);
}

// The quad kernel for MR rows of x, by x's type: int16 (act16_quad_rows, or act16_quad_one for one row) or int8.
template <int kNbg, int MR>
inline void quad_rows(const uint8_t* quad, const Int4Quads& layout, const int16_t* xq, const float* xd,
                      const float* xs, int64_t K, float* out) {
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
  act16_quad_rows512<kNbg, MR>(quad, layout, xq, xd, xs, K, out);
#else
  if constexpr (MR == 1) act16_quad_one<kNbg>(quad, layout, xq, xd, xs, out);
  else act16_quad_rows<kNbg, MR>(quad, layout, xq, xd, xs, K, out);
#endif
}
template <int kNbg, int MR>
inline void quad_rows(const uint8_t* quad, const Int4Quads& layout, const int8_t* xq, const float* xd,
                      const float* xs, int64_t K, float* out) {
  act8_quad_rows<kNbg, MR>(quad, layout, xq, xd, xs, K, out);
}

// The same for a run-time row count mr, 1 to kQuadXRows.
template <int kNbg, typename XT>
inline void quad_rows_n(int mr, const uint8_t* quad, const Int4Quads& layout, const XT* xq, const float* xd,
                        const float* xs, int64_t K, float* out) {
  static_assert(kQuadXRows == 4, "one case per row count below");
  switch (mr) {
    case 4: quad_rows<kNbg, 4>(quad, layout, xq, xd, xs, K, out); break;
    case 3: quad_rows<kNbg, 3>(quad, layout, xq, xd, xs, K, out); break;
    case 2: quad_rows<kNbg, 2>(quad, layout, xq, xd, xs, K, out); break;
    default: quad_rows<kNbg, 1>(quad, layout, xq, xd, xs, K, out); break;
  }
}

// One parallel task of an int4 matvec on rounded activations (XT int16_t: act_bits 16, int8_t: 8): output rows
// [n0, n1), n0 a multiple of 4 (whole quads; n1 may stop short of the last quad's padding). Every row of x meets a
// quad while it is in L1, kQuadXRows rows at a time.
template <typename XT>
void int4_quads_task(const QWeight& w, int64_t M, const XT* xq, const float* xd, const float* xs, float* y,
                     int64_t n0, int64_t n1) {
  const Int4Quads layout(w);
  const int64_t N = w.N, K = w.K, ng = layout.ng, nb = K / 32;
  const float* bp = w.bias.defined() ? w.bias.data_ptr<float>() : nullptr;
  float t[4 * kQuadXRows];
  for (int64_t n = n0; n < n1; n += 4) {
    const int nr = static_cast<int>(std::min<int64_t>(4, N - n));
    const uint8_t* quad = layout.quad(n);
    for (int64_t m0 = 0; m0 < M; m0 += kQuadXRows) {
      const int mr = static_cast<int>(std::min<int64_t>(kQuadXRows, M - m0));
      if (layout.nbg == 1) quad_rows_n<1>(mr, quad, layout, xq + m0 * K, xd + m0 * nb, xs + m0 * ng, K, t);
      else quad_rows_n<0>(mr, quad, layout, xq + m0 * K, xd + m0 * nb, xs + m0 * ng, K, t);
      for (int m = 0; m < mr; ++m)
        for (int r = 0; r < nr; ++r) y[(m0 + m) * N + n + r] = t[4 * m + r] + (bp ? bp[n + r] : 0.f);
    }
  }
}

#else  // portable: dequantize the row, then 4 chains of 8 lanes in scalar code (batch-invariant as well)

inline float dot_scalar(const float* w, const float* x, int64_t K) {
  float c[4][8] = {};
  int64_t k = 0;
  for (int64_t i = 0; k + 8 <= K; k += 8, ++i)
    for (int l = 0; l < 8; ++l) c[i % 4][l] += w[k + l] * x[k + l];
  float v[8];
  for (int l = 0; l < 8; ++l) v[l] = (c[0][l] + c[1][l]) + (c[2][l] + c[3][l]);
  float s = ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
  for (; k < K; ++k) s += w[k] * x[k];
  return s;
}

#endif

// Output rows per parallel task at least (the float32 kernel this replaces measured that smaller ones cost more
// to hand out than they save). With 2 threads every matrix here is split in two halves anyway.
constexpr int64_t kGrain = 64;
// Rows of x per parallel task of the input's preparation.
constexpr int64_t kPrepareGrain = 16;

// Row units a matrix is split in: int4 hands out whole row quads, the others single rows.
inline int64_t row_unit(const QWeight& w) { return w.bits == 4 ? 4 : 1; }

// task(n0, n1) over the output rows, in parallel (n1 may stop short of an int4 quad's padding).
template <class F>
void split_rows(const QWeight& w, const F& task) {
  const int64_t N = w.N, u = row_unit(w);
  at::parallel_for(0, (N + u - 1) / u, kGrain / u, [&](int64_t a, int64_t b) { task(u * a, std::min(N, u * b)); });
}

// Output rows [n0, n1) of y = x W^T (+ bias) from a prepared input, on the calling thread.
void matvec_rows(const QWeight& w, const MatvecInput& in, float* y, int64_t n0, int64_t n1) {
  const int64_t N = w.N, K = w.K, G = w.group, M = in.M;
  const float* x = in.x;
  const float* bp = w.bias.defined() ? w.bias.data_ptr<float>() : nullptr;
#if JISU_QLINEAR_VEC
  if (w.bits == 32) {
    f32_task(w.data.data_ptr<float>(), x, M, K, y, N, bp, n0, n1);
    return;
  }
  if (G % 8 != 0) {
    std::vector<float> sc(K / G);
    for (int64_t n = n0; n < n1; ++n) scalar_rows(w, n, x, M, y + n, N, bp ? bp[n] : 0.f, sc.data());
  } else if (in.xq8) {
    int4_quads_task(w, M, in.xq8, in.xd, in.xs, y, n0, n1);
  } else if (in.xa) {
    amx_int4_task(w, in, y, n0, n1);
  } else if (in.xq) {
    if (w.bits == 4) int4_quads_task(w, M, in.xq, in.xd, in.xs, y, n0, n1);
    else act16_int8_task(w, M, in.xq, in.xd, y, n0, n1);
  } else if (w.bits == 4) {
    quant_task<Int4Block>(w, x, M, y, in.xs, n0, n1);
  } else {
    quant_task<Int8Block>(w, x, M, y, in.xs, n0, n1);
  }
#else
  Scratch& s = scratch();
  if (static_cast<int64_t>(s.row.size()) < K) s.row.resize(K);
  const int64_t ng = w.bits == 32 ? 1 : K / G;
  if (static_cast<int64_t>(s.sc.size()) < ng) s.sc.resize(ng), s.zc.resize(ng);
  for (int64_t n = n0; n < n1; ++n) {
    dequantize_blocks_row(w, n, s.row.data(), s.sc.data(), s.zc.data());
    for (int64_t m = 0; m < M; ++m) y[m * N + n] = dot_scalar(s.row.data(), x + m * K, K) + (bp ? bp[n] : 0.f);
  }
#endif
  add_outlier_columns(w, x, M, y, n0, n1);
}

}  // namespace

MatvecInput qweight_prepare_begin(const QWeight& w, const float* x, int64_t M) {
  MatvecInput in;
  in.x = x, in.M = M;
#if JISU_QLINEAR_VEC
  const int64_t K = w.K, G = w.group;
  if (w.bits == 32 || G % 8 != 0 || M == 0) return in;
  Scratch& s = scratch();
  // Group sums of x for the zero-point term (int4).
  if (w.bits == 4) {
    if (static_cast<int64_t>(s.xs.size()) < M * (K / G)) s.xs.resize(M * (K / G));
    in.xs = s.xs.data();
  }
  if (w.act_bits <= 16 && K % 32 == 0 && G % 32 == 0) {
    // act_bits 8 is int4's alone: int8 weights keep int16 activations (their signed bytes would need vpmaddubsw's
    // sign juggling).
    const bool act8 = w.act_bits == 8 && w.bits == 4;
    if (static_cast<int64_t>(s.xd.size()) < M * K / 32) s.xd.resize(M * K / 32);
    in.xd = s.xd.data();
    if (act8) {
      if (static_cast<int64_t>(s.xq8.size()) < M * K) s.xq8.resize(M * K);
      in.xq8 = s.xq8.data();
    } else if (amx_takes(w, M)) {  // the rounded rows go straight into the tiles' layout
      if (static_cast<int64_t>(s.xa.size()) < amx_x_elems(M, K)) s.xa.resize(amx_x_elems(M, K));
      in.xa = s.xa.data();
    } else {
      if (static_cast<int64_t>(s.xq.size()) < M * K) s.xq.resize(M * K);
      in.xq = s.xq.data();
    }
  }
#endif
  return in;
}

void qweight_prepare_rows(const QWeight& w, const MatvecInput& in, int64_t m0, int64_t m1) {
#if JISU_QLINEAR_VEC
  const int64_t K = w.K, G = w.group, nb = K / 32;
  if (in.xa && m1 == in.M) amx_pad_rows(in.M, K, in.xa);
  if (m0 >= m1) return;
  if (in.xs) group_sums(in.x + m0 * K, m1 - m0, K, G, in.xs + m0 * (K / G));
  if (!in.xd) return;
  Scratch& s = scratch();  // this thread's: a row with its outlier columns zeroed, a rounded row for AMX
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = in.x + m * K;
    if (w.outlier_cols.defined()) {
      // The blocks hold 0 in the outlier columns: leaving their (large) inputs out of the int16 rounding keeps
      // the other inputs of those 32-blocks finer.
      if (static_cast<int64_t>(s.row.size()) < K) s.row.resize(K);
      std::memcpy(s.row.data(), xr, K * sizeof(float));
      const int64_t* c = w.outlier_cols.data_ptr<int64_t>();
      for (int64_t j = 0; j < w.outlier_cols.numel(); ++j) s.row[c[j]] = 0.f;
      xr = s.row.data();
    }
    float* xd = in.xd + m * nb;
    if (in.xq8) {
      quantize_act8(xr, 1, K, in.xq8 + m * K, xd);
    } else if (in.xa) {
      if (static_cast<int64_t>(s.row16.size()) < K) s.row16.resize(K);
      quantize_act16(xr, 1, K, s.row16.data(), xd);
      amx_prepare_x_row(s.row16.data(), m, K, in.xa);
    } else {
      quantize_act16(xr, 1, K, in.xq + m * K, xd);
    }
  }
#else
  (void)w, (void)in, (void)m0, (void)m1;
#endif
}

MatvecInput qweight_prepare(const QWeight& w, const float* x, int64_t M) {
  const MatvecInput in = qweight_prepare_begin(w, x, M);
  qweight_prepare_rows(w, in, 0, M);
  return in;
}

void qweight_rows(const QWeight& w, const MatvecInput& in, float* y, int64_t part, int64_t parts) {
  if (in.M == 0 || w.N == 0) return;
  // The split at::parallel_for makes (equal parts of whole units), so a team computes what qweight_matvec does.
  const int64_t u = row_unit(w), units = (w.N + u - 1) / u, per = (units + parts - 1) / parts;
  const int64_t n0 = std::min(w.N, part * per * u), n1 = std::min(w.N, (part + 1) * per * u);
  if (n0 < n1) matvec_rows(w, in, y, n0, n1);
}

void qweight_matvec(const QWeight& w, const float* x, int64_t M, float* y) {
  TORCH_CHECK(M >= 0, "qweight_matvec: M must be >= 0, got ", M);
  if (M == 0 || w.N == 0) return;
  const MatvecInput in = qweight_prepare_begin(w, x, M);
  at::parallel_for(0, M, kPrepareGrain, [&](int64_t m0, int64_t m1) { qweight_prepare_rows(w, in, m0, m1); });
  split_rows(w, [&](int64_t n0, int64_t n1) { matvec_rows(w, in, y, n0, n1); });
}

at::Tensor qweight_dequantize(const QWeight& w, const c10::optional<at::Tensor>& rows) {
  // Output row i is matrix row ip[i] (an embedding lookup) or i (the whole matrix). A lookup's few rows stay on
  // the calling thread: at::parallel_for runs a range under its grain inline.
  at::Tensor ids;
  const int64_t* ip = nullptr;
  if (rows) {
    TORCH_CHECK(rows->scalar_type() == at::kLong && rows->device().is_cpu(),
                "qweight_dequantize: rows must be int64 CPU indices, got ", toString(rows->scalar_type()));
    ids = rows->contiguous().view({-1});
    ip = ids.data_ptr<int64_t>();
    for (int64_t i = 0; i < ids.numel(); ++i)
      TORCH_CHECK(ip[i] >= 0 && ip[i] < w.N, "qweight_dequantize: row ", ip[i], " outside the matrix's ", w.N,
                  " rows");
  }
  const int64_t R = rows ? ids.numel() : w.N, K = w.K;
  at::Tensor out = at::empty({R, K}, at::kFloat);
  float* op = out.data_ptr<float>();
  at::parallel_for(0, R, kGrain, [&](int64_t i0, int64_t i1) {
    std::vector<float> sc(K / std::max<int64_t>(w.group, 1) + 1), zc(sc.size());
    for (int64_t i = i0; i < i1; ++i) dequantize_row(w, rows ? ip[i] : i, op + i * K, sc.data(), zc.data());
  });
  return out;
}

at::Tensor qlinear(const at::Tensor& x, const QWeight& w) {
  TORCH_CHECK(x.defined() && x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "qlinear: x must be a float32 [M, K] CPU tensor, got ",
              x.defined() ? toString(x.scalar_type()) : "undefined", " ", x.defined() ? x.sizes() : at::IntArrayRef{});
  TORCH_CHECK(x.size(1) == w.K, "qlinear: x has ", x.size(1), " columns, the weight has ", w.K, " inputs");
  at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), N = w.N, K = w.K;
  // Up to a few hundred rows the matvec kernels beat a GEMM. Measured (2 threads, SmolLM2's 30 layers + output
  // layer, ms per pass, qweight_matvec vs the GEMM path below): int4 group 32 at M = 17: 46 vs 78, 64: 153 vs 264,
  // 128: 296 vs 380, 192: 456 vs 498, 256: 645 vs 563; int8 group 32 at 192: 467 vs 523, 256: 664 vs 572;
  // float32 (vs at::linear) at 17: 59 vs 91, 64: 144 vs 166, 128: 270 vs 284.
  if (M <= (w.bits == 32 ? 128 : 192)) {
    at::Tensor y = at::empty({M, N}, xc.options());
    qweight_matvec(w, xc.data_ptr<float>(), M, y.data_ptr<float>());
    return y;
  }
  const c10::optional<at::Tensor> bias = w.bias.defined() ? c10::optional<at::Tensor>(w.bias) : c10::nullopt;
  if (w.bits == 32) return at::linear(xc, w.data, bias);
  // Prefill: dequantize a tile of weight rows at a time (rows split over the threads) into a float32 GEMM that
  // writes straight into the tile's columns of y. Tiles of ~1 MB of floats: the GEMM runs at float32 torch.mm's
  // speed (measured at M = 512 on SmolLM2's shapes, see bench_qlinear.py) while the dequantized tile stays in L2.
  // Measured and dropped: each thread taking whole tiles with a single-threaded GEMM (no barrier per tile) was no
  // faster, and unbalanced when a matrix has few tiles.
  constexpr int64_t kTileFloats = 256 * 1024;
  const int64_t tile = std::min(N, std::max<int64_t>(64, kTileFloats / std::max<int64_t>(K, 1) / 16 * 16));
  at::Tensor y = at::empty({M, N}, xc.options());
  at::Tensor wt = at::empty({tile, K}, at::kFloat);
  float* wp = wt.data_ptr<float>();
  for (int64_t n0 = 0; n0 < N; n0 += tile) {
    const int64_t nt = std::min(N, n0 + tile) - n0;
    at::parallel_for(0, nt, 16, [&](int64_t a, int64_t b) {
      std::vector<float> sc(K / w.group + 1), zc(sc.size());
      for (int64_t i = a; i < b; ++i) dequantize_row(w, n0 + i, wp + i * K, sc.data(), zc.data());
    });
    at::Tensor out = y.narrow(1, n0, nt);
    at::Tensor wv = wt.narrow(0, 0, nt).t();
    if (bias)
      at::addmm_out(out, bias->narrow(0, n0, nt), xc, wv);
    else
      at::mm_out(out, xc, wv);
  }
  return y;
}

void register_qlinear(pybind11::module_& m) {
  pybind11::class_<QWeight>(m, "QWeight")
      .def(pybind11::init<int64_t, at::Tensor, c10::optional<at::Tensor>, c10::optional<at::Tensor>, int64_t,
                          c10::optional<at::Tensor>, c10::optional<at::Tensor>, c10::optional<at::Tensor>>(),
           pybind11::arg("bits"), pybind11::arg("data"), pybind11::arg("scales") = pybind11::none(),
           pybind11::arg("zeros") = pybind11::none(), pybind11::arg("group") = 0,
           pybind11::arg("bias") = pybind11::none(), pybind11::arg("outlier_cols") = pybind11::none(),
           pybind11::arg("outlier_weights") = pybind11::none())
      .def_readonly("bits", &QWeight::bits)
      .def_readonly("N", &QWeight::N)
      .def_readonly("K", &QWeight::K)
      .def_readonly("group", &QWeight::group)
      .def_property_readonly(
          "repacked", [](const QWeight& w) { return w.bits == 4; },
          "whether the kernels hold their own copy of the blocks (int4 row quads, qlinear.h)")
      .def_property(
          "act_bits", [](const QWeight& w) { return w.act_bits; },
          [](QWeight& w, int64_t v) {
            TORCH_CHECK(v == 8 || v == 16 || v == 32, "act_bits must be 8, 16 or 32 (int8, int16 or float32 "
                        "activations), got ", v);
            w.act_bits = v;
          })
      .def("nbytes", &QWeight::nbytes);
  // Without the GIL, as torch's own ops run: a server's event loop (/health, other clients) keeps running while
  // the engine thread is inside a long product (the soak saw /health wait up to 2.9 s before this).
  m.def("qlinear", &qlinear, "y = x @ W.T + b for a QWeight W (float32 x on CPU)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("qweight_dequantize", &qweight_dequantize,
        "a QWeight as a float32 [N, K] matrix, or only the rows given (int64 indices, flattened): [len(rows), K]",
        pybind11::arg("weight"), pybind11::arg("rows") = pybind11::none(),
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("amx_available", &amx_available,
        "whether int4 products of many rows run on AMX tiles here (AVX-512 build, AMX-BF16 CPU, OS grant; "
        "JISU_AMX=0 turns it off)");
  m.def("amx_set_enabled", &amx_set_enabled, "turn the AMX kernel off or back on (tests, benchmarks)",
        pybind11::arg("on"));
  // For benchmarks/bench_qlinear.py: the weights' qweight_matvec calls back to back from C++, as a fused decoder
  // makes them (no Python or tensor overhead between calls); seconds for each of `passes` passes.
  m.def(
      "_time_matvec",
      [](const std::vector<QWeight>& ws, int64_t M, int64_t passes) {
        int64_t maxK = 1, maxN = 1;
        for (const QWeight& w : ws) maxK = std::max(maxK, w.K), maxN = std::max(maxN, w.N);
        std::vector<float> x(M * maxK), y(M * maxN);
        for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>((i * 7919) % 2001) / 1000.f - 1.f;
        std::vector<double> out;
        for (int64_t p = 0; p < passes; ++p) {
          const auto t0 = std::chrono::steady_clock::now();
          for (const QWeight& w : ws) qweight_matvec(w, x.data(), M, y.data());
          out.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        }
        return out;
      },
      pybind11::arg("weights"), pybind11::arg("M"), pybind11::arg("passes"));
}
