// Attention for one prefill chunk: queries at positions start .. start + n - 1 against the keys at positions
// 0 .. start + n - 1 (causal; optionally within a sliding window; optionally Gemma 2's softcap), GQA, with K/V read
// from the paged cache through a slot index (or, when the chunk is the whole context, from the chunk's own rows).
//
// Flash style: a task is (kv head, tile of kQueryTile queries); its rows are the tile's queries times the kv head's
// G q heads. It walks the visible keys in blocks of kKeyBlock, keeping per row a running max m, sum l and
// unnormalised output o (online softmax: a block with a larger max rescales what came before by e^(m_old - m_new)).
// Each K/V block is widened from float16 once and serves every row of the task; key blocks that no row sees are
// never visited.
//
// Layouts that keep the products free of horizontal sums: q arrives transposed per task (qt[d][row]), so scores
// come out as s[key][row] (8 rows per lane vector), and the softmax statistics are vectors over rows too.
//
// NOTE: every row's arithmetic depends only on its own query and the keys: blocks start at multiples of kKeyBlock
// in position (not where the chunk starts), lanes never mix rows, and a block a row cannot see changes nothing of it
// (its weights are exact zeros and its rescale factor e^0 = 1). So a token's result is bit-identical however its
// prompt was chunked, fresh K/V or cached, as long as the cache dtype is the same.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "vmath.h"

namespace {

constexpr int64_t kQueryTile = 16;  // queries per task (rows: times the q heads per kv head)
constexpr int64_t kKeyBlock = 64;   // keys per online-softmax step
constexpr int64_t kRowAlign = 16;   // rows are padded to this (two lane vectors in the score tile)
// The running max before any visible key: finite, so m_old - m_new never computes -inf - -inf.
constexpr float kNoMax = -std::numeric_limits<float>::max();
constexpr float kMasked = -std::numeric_limits<float>::infinity();

// One chunk's shapes and pointers; K/V of kv head g for position p: k + slot(p) * k_row + g * D.
template <typename KV>
struct Chunk {
  const float* q;
  int64_t q_row;  // q [n, H, D], head stride D
  const KV* k;
  const KV* v;
  int64_t k_row, v_row;
  const int64_t* slots;  // [start + n] rows of k/v by position; null: position p is row p
  float* out;
  int64_t out_row;  // out [n, H, D], head stride D
  int64_t n, H, KVH, D, start, window;  // window 0: none
  float q_scale, softcap;               // softcap 0: none (then q_scale is scale, else scale / softcap)
  int64_t slot(int64_t p) const { return slots ? slots[p] : p; }
};

// A task's working set, reused across tasks (thread_local).
struct Scratch {
  std::vector<float> qt, s, o, m, l, corr, kb, vb;
  std::vector<const float*> krow, vrow;
  void size(int64_t rows, int64_t D) {
    auto grow = [](std::vector<float>& v, int64_t n) {
      if (static_cast<int64_t>(v.size()) < n) v.resize(n);
    };
    grow(qt, D * rows);
    grow(s, kKeyBlock * rows);
    grow(o, rows * D);
    grow(m, rows);
    grow(l, rows);
    grow(corr, rows);
    grow(kb, kKeyBlock * D);
    grow(vb, kKeyBlock * D);
    krow.resize(kKeyBlock);
    vrow.resize(kKeyBlock);
  }
};
Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

// Rows of a block as float32: pointers straight into a float32 cache; float16 rows widened into `buf` (once per
// block, for every row of the task).
inline void block_rows(const float* base, int64_t row_stride, const Chunk<float>& c, int64_t j0, int64_t kn,
                       int64_t, float*, const float** rows) {
  for (int64_t j = 0; j < kn; ++j) rows[j] = base + c.slot(j0 + j) * row_stride;
}
inline void block_rows(const c10::Half* base, int64_t row_stride, const Chunk<c10::Half>& c, int64_t j0, int64_t kn,
                       int64_t D, float* buf, const float** rows) {
  for (int64_t j = 0; j < kn; ++j) {
    const c10::Half* x = base + c.slot(j0 + j) * row_stride;
    float* y = buf + j * D;
    int64_t d = 0;
#if JISU_VMATH_AVX2
    for (; d + 8 <= D; d += 8) _mm256_storeu_ps(y + d, load_kv8(x + d));
#endif
    for (; d < D; ++d) y[d] = kv_float(x[d]);
    rows[j] = y;
  }
}

// Scores of a key block: s[j * ld + r] = sum_d k_j[d] qt[d * ld + r] for keys j < kn and rows r < ld.
inline void scores_portable(const float* const* krow, int64_t kn, const float* qt, int64_t ld, int64_t D, float* s) {
  for (int64_t j = 0; j < kn; ++j) {
    float* sj = s + j * ld;
    std::fill(sj, sj + ld, 0.f);
    for (int64_t d = 0; d < D; ++d) {
      const float kd = krow[j][d];
      const float* q = qt + d * ld;
#pragma omp simd
      for (int64_t r = 0; r < ld; ++r) sj[r] += kd * q[r];
    }
  }
}

// o[r * D + c] = o[r * D + c] * corr[r] + sum_j p[j * ld + r] v_j[c] for rows r < ld.
inline void values_portable(const float* p, int64_t ld, const float* const* vrow, int64_t kn, const float* corr,
                            int64_t D, float* o) {
  for (int64_t r = 0; r < ld; ++r) {
    float* orow = o + r * D;
    const float cr = corr[r];
#pragma omp simd
    for (int64_t c = 0; c < D; ++c) orow[c] *= cr;
    for (int64_t j = 0; j < kn; ++j) {
      const float pj = p[j * ld + r];
      const float* vj = vrow[j];
#pragma omp simd
      for (int64_t c = 0; c < D; ++c) orow[c] += pj * vj[c];
    }
  }
}

// Online softmax over a block of scores s[j * ld + r] (j < kn): per row, m <- max(m, block max), corr = e^(m_old -
// m_new), s <- e^(s - m_new) (masked scores: 0), l <- l * corr + sum_j s.
inline void softmax_portable(float* s, int64_t kn, int64_t ld, float* m, float* l, float* corr) {
  for (int64_t r = 0; r < ld; ++r) {
    float mx = m[r];
    for (int64_t j = 0; j < kn; ++j) mx = std::max(mx, s[j * ld + r]);
    corr[r] = exp_clamped(m[r] - mx);
    float sum = 0.f;
    for (int64_t j = 0; j < kn; ++j) {
      float& x = s[j * ld + r];
      x = x == kMasked ? 0.f : exp_clamped(x - mx);
      sum += x;
    }
    l[r] = l[r] * corr[r] + sum;
    m[r] = mx;
  }
}

#if JISU_VMATH_AVX2
// ---- AVX2 tiles (head_dim % 8 == 0; rows are always a multiple of kRowAlign) ----
// NOTE: `#pragma GCC unroll` on the loops over a tile's accumulators: without it GCC kept the accumulator arrays in
// memory and stored them every iteration (a 512-token chunk on one thread: 13.2 ms with, 7.3 ms after).

// Scores of NK keys against 16 rows: 2 * NK accumulators, each q lane vector loaded once per d for NK keys.
template <int NK>
inline void scores_tile(const float* const* krow, const float* qt, int64_t ld, int64_t D, float* s) {
  __m256 a0[NK], a1[NK];
  #pragma GCC unroll 8
  for (int j = 0; j < NK; ++j) a0[j] = a1[j] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const __m256 q0 = _mm256_loadu_ps(qt + d * ld), q1 = _mm256_loadu_ps(qt + d * ld + 8);
    #pragma GCC unroll 8
    for (int j = 0; j < NK; ++j) {
      const __m256 kd = _mm256_broadcast_ss(krow[j] + d);
      a0[j] = _mm256_fmadd_ps(kd, q0, a0[j]);
      a1[j] = _mm256_fmadd_ps(kd, q1, a1[j]);
    }
  }
  #pragma GCC unroll 8
  for (int j = 0; j < NK; ++j) {
    _mm256_storeu_ps(s + j * ld, a0[j]);
    _mm256_storeu_ps(s + j * ld + 8, a1[j]);
  }
}

inline void scores_avx2(const float* const* krow, int64_t kn, const float* qt, int64_t ld, int64_t D, float* s) {
  constexpr int NK = 6;
  for (int64_t r0 = 0; r0 < ld; r0 += 16) {
    int64_t j = 0;
    for (; j + NK <= kn; j += NK) scores_tile<NK>(krow + j, qt + r0, ld, D, s + j * ld + r0);
    switch (kn - j) {
      case 5: scores_tile<5>(krow + j, qt + r0, ld, D, s + j * ld + r0); break;
      case 4: scores_tile<4>(krow + j, qt + r0, ld, D, s + j * ld + r0); break;
      case 3: scores_tile<3>(krow + j, qt + r0, ld, D, s + j * ld + r0); break;
      case 2: scores_tile<2>(krow + j, qt + r0, ld, D, s + j * ld + r0); break;
      case 1: scores_tile<1>(krow + j, qt + r0, ld, D, s + j * ld + r0); break;
      default: break;
    }
  }
}

// R rows x NV lane vectors of o, rescaled by corr and then accumulating the block's weighted values.
template <int R, int NV>
inline void values_tile(const float* p, int64_t ld, const float* const* vrow, int64_t kn, const float* corr,
                        int64_t D, int64_t c0, float* o) {
  __m256 a[R][NV];
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const __m256 cr = _mm256_broadcast_ss(corr + r);
    for (int u = 0; u < NV; ++u) a[r][u] = _mm256_mul_ps(_mm256_loadu_ps(o + r * D + c0 + 8 * u), cr);
  }
  for (int64_t j = 0; j < kn; ++j) {
    __m256 vj[NV];
    #pragma GCC unroll 8
    for (int u = 0; u < NV; ++u) vj[u] = _mm256_loadu_ps(vrow[j] + c0 + 8 * u);
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 pj = _mm256_broadcast_ss(p + j * ld + r);
      for (int u = 0; u < NV; ++u) a[r][u] = _mm256_fmadd_ps(pj, vj[u], a[r][u]);
    }
  }
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < NV; ++u) _mm256_storeu_ps(o + r * D + c0 + 8 * u, a[r][u]);
}

template <int R>
inline void values_rows(const float* p, int64_t ld, const float* const* vrow, int64_t kn, const float* corr,
                        int64_t D, float* o) {
  int64_t c0 = 0;
  for (; c0 + 16 <= D; c0 += 16) values_tile<R, 2>(p, ld, vrow, kn, corr, D, c0, o);
  if (c0 < D) values_tile<R, 1>(p, ld, vrow, kn, corr, D, c0, o);
}

// Rows in tiles of 6 (12 accumulators: enough independent FMA chains to hide their latency), then the 2 or 4 left
// (rows are a multiple of 16).
inline void values_avx2(const float* p, int64_t ld, const float* const* vrow, int64_t kn, const float* corr,
                        int64_t D, float* o) {
  int64_t r0 = 0;
  for (; r0 + 6 <= ld; r0 += 6) values_rows<6>(p + r0, ld, vrow, kn, corr + r0, D, o + r0 * D);
  if (ld - r0 == 4) values_rows<4>(p + r0, ld, vrow, kn, corr + r0, D, o + r0 * D);
  if (ld - r0 == 2) values_rows<2>(p + r0, ld, vrow, kn, corr + r0, D, o + r0 * D);
}

// Masked: the block has kMasked scores, whose weights must come out as exact zeros (e^-87.3 would not).
template <bool Masked>
inline void softmax_avx2(float* s, int64_t kn, int64_t ld, float* m, float* l, float* corr) {
  const __m256 masked = _mm256_set1_ps(kMasked);
  for (int64_t r = 0; r < ld; r += 8) {
    const __m256 m_old = _mm256_loadu_ps(m + r);
    __m256 mx = m_old;
    for (int64_t j = 0; j < kn; ++j) mx = _mm256_max_ps(mx, _mm256_loadu_ps(s + j * ld + r));
    const __m256 c = exp_clamped8(_mm256_sub_ps(m_old, mx));
    __m256 sum = _mm256_setzero_ps();
    for (int64_t j = 0; j < kn; ++j) {
      const __m256 x = _mm256_loadu_ps(s + j * ld + r);
      __m256 e = exp_clamped8(_mm256_sub_ps(x, mx));
      if (Masked) e = _mm256_and_ps(e, _mm256_cmp_ps(x, masked, _CMP_NEQ_OQ));
      _mm256_storeu_ps(s + j * ld + r, e);
      sum = _mm256_add_ps(sum, e);
    }
    _mm256_storeu_ps(l + r, _mm256_fmadd_ps(_mm256_loadu_ps(l + r), c, sum));
    _mm256_storeu_ps(m + r, mx);
    _mm256_storeu_ps(corr + r, c);
  }
}

#endif

// The block steps on the AVX2 tiles where they apply (head_dim % 8 == 0 for the products), else portably.
inline void block_scores(bool vec, const float* const* krow, int64_t kn, const float* qt, int64_t ld, int64_t D,
                         float* s) {
#if JISU_VMATH_AVX2
  if (vec) return scores_avx2(krow, kn, qt, ld, D, s);
#endif
  scores_portable(krow, kn, qt, ld, D, s);
}

inline void block_values(bool vec, const float* p, int64_t ld, const float* const* vrow, int64_t kn,
                         const float* corr, int64_t D, float* o) {
#if JISU_VMATH_AVX2
  if (vec) return values_avx2(p, ld, vrow, kn, corr, D, o);
#endif
  values_portable(p, ld, vrow, kn, corr, D, o);
}

inline void block_softmax(bool masked, float* s, int64_t kn, int64_t ld, float* m, float* l, float* corr) {
#if JISU_VMATH_AVX2
  if (masked)
    softmax_avx2<true>(s, kn, ld, m, l, corr);
  else
    softmax_avx2<false>(s, kn, ld, m, l, corr);
#else
  softmax_portable(s, kn, ld, m, l, corr);
#endif
}

// Scores that rows cannot see set to kMasked: row r is the query at position first + r / G (rows from `rows` on
// are padding and see nothing); it sees key p when p <= its position and, with a window, p > position - window.
inline void mask_block(float* s, int64_t ld, int64_t j0, int64_t kn, int64_t first, int64_t G, int64_t rows,
                       int64_t window) {
  for (int64_t j = 0; j < kn; ++j) {
    const int64_t p = j0 + j;
    const int64_t lo = std::clamp<int64_t>((p - first) * G, 0, rows);
    const int64_t hi = window ? std::clamp<int64_t>((p + window - first) * G, lo, rows) : rows;
    float* sj = s + j * ld;
    std::fill(sj, sj + lo, kMasked);
    std::fill(sj + hi, sj + ld, kMasked);
  }
}

// One task: kv head g, queries [i0, i1) of the chunk.
template <typename KV>
void attend_tile(const Chunk<KV>& c, int64_t g, int64_t i0, int64_t i1, Scratch& w) {
  const int64_t G = c.H / c.KVH, D = c.D;
  const int64_t rows = (i1 - i0) * G, ld = (rows + kRowAlign - 1) / kRowAlign * kRowAlign;
  w.size(ld, D);
  float *qt = w.qt.data(), *s = w.s.data(), *o = w.o.data();
  float *m = w.m.data(), *l = w.l.data(), *corr = w.corr.data();
  // Row r = (query i0 + r / G, q head g * G + r % G), so rows of one query sit together (see mask_block).
  std::fill(qt, qt + D * ld, 0.f);
  for (int64_t r = 0; r < rows; ++r) {
    const float* qr = c.q + (i0 + r / G) * c.q_row + (g * G + r % G) * D;
    for (int64_t d = 0; d < D; ++d) qt[d * ld + r] = qr[d] * c.q_scale;
  }
  std::fill(o, o + ld * D, 0.f);
  std::fill(m, m + ld, kNoMax);
  std::fill(l, l + ld, 0.f);

  const int64_t first = c.start + i0, last = c.start + i1 - 1;
  const int64_t lo = c.window ? std::max<int64_t>(0, first - c.window + 1) / kKeyBlock * kKeyBlock : 0;
  const bool vec = D % 8 == 0;
  for (int64_t j0 = lo; j0 <= last; j0 += kKeyBlock) {
    const int64_t kn = std::min(kKeyBlock, last + 1 - j0);
    const float** krow = w.krow.data();
    const float** vrow = w.vrow.data();
    block_rows(c.k + g * D, c.k_row, c, j0, kn, D, w.kb.data(), krow);
    block_rows(c.v + g * D, c.v_row, c, j0, kn, D, w.vb.data(), vrow);
    block_scores(vec, krow, kn, qt, ld, D, s);
    if (c.softcap > 0.f) softcap_scores(s, kn * ld, c.softcap);
    const bool all_visible = j0 + kn - 1 <= first && (!c.window || j0 > last - c.window);
    if (!all_visible) mask_block(s, ld, j0, kn, first, G, rows, c.window);
    block_softmax(!all_visible, s, kn, ld, m, l, corr);
    block_values(vec, s, ld, vrow, kn, corr, D, o);
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* y = c.out + (i0 + r / G) * c.out_row + (g * G + r % G) * D;
    const float* x = o + r * D;
    const float inv = 1.f / l[r];
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) y[d] = x[d] * inv;
  }
}

// Tasks (kv head, query tile), the longest first (a later tile sees more keys), handed out one at a time: the
// causal triangle makes them unequal, and a static split gave one thread most of the work.
template <typename KV>
void attend_chunk(const Chunk<KV>& c) {
  const int64_t tiles = (c.n + kQueryTile - 1) / kQueryTile, tasks = tiles * c.KVH;
  std::atomic<int64_t> next{0};
  auto run = [&](int64_t, int64_t) {
    Scratch& w = scratch();
    for (int64_t t = next++; t < tasks; t = next++) {
      const int64_t tile = tiles - 1 - t / c.KVH, g = t % c.KVH;
      attend_tile(c, g, tile * kQueryTile, std::min(c.n, (tile + 1) * kQueryTile), w);
    }
  };
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), tasks);
  if (threads <= 1)
    run(0, 1);
  else
    at::parallel_for(0, threads, 1, run);
}

void check_heads(const at::Tensor& t, const char* name, int64_t D) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 3 && t.size(2) == D && t.stride(2) == 1 && t.stride(1) == D,
              name, " must be a CPU tensor [rows, heads, ", D, "] with contiguous heads");
}

void prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const c10::optional<at::Tensor>& slots, int64_t start, int64_t window, double scale,
                       double softcap, at::Tensor& out) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat, "q must be float32 [n, H, D]");
  const int64_t n = q.size(0), H = q.size(1), D = q.size(2), KVH = k.dim() == 3 ? k.size(1) : 0;
  check_heads(q, "q", D);
  check_heads(k, "k", D);
  check_heads(v, "v", D);
  check_heads(out, "out", D);
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.size(0) == n && out.size(1) == H, "out must be float32 [n, H, D]");
  TORCH_CHECK(KVH > 0 && H % KVH == 0 && v.size(1) == KVH, "q heads (", H, ") must be a multiple of kv heads");
  TORCH_CHECK(k.scalar_type() == v.scalar_type() && (k.scalar_type() == at::kFloat || k.scalar_type() == at::kHalf),
              "k and v must both be float32 or float16");
  TORCH_CHECK(start >= 0 && window >= 0 && softcap >= 0, "start, window and softcap must be >= 0");
  const int64_t ctx = start + n, kv_rows = std::min(k.size(0), v.size(0));
  const int64_t* slot_ptr = nullptr;
  if (slots.has_value()) {
    const at::Tensor& s = *slots;
    TORCH_CHECK(s.scalar_type() == at::kLong && s.dim() == 1 && s.is_contiguous() && s.numel() >= ctx,
                "slots must be contiguous int64 [context_len]");
    slot_ptr = s.data_ptr<int64_t>();
    for (int64_t p = 0; p < ctx; ++p)
      TORCH_CHECK(slot_ptr[p] >= 0 && slot_ptr[p] < kv_rows, "slot ", slot_ptr[p], " outside the cache");
  } else {
    TORCH_CHECK(kv_rows >= ctx, "without slots, k and v need a row for each of the ", ctx, " positions");
  }
  if (n == 0) return;
  const float cap = static_cast<float>(softcap);
  const float q_scale = static_cast<float>(cap > 0.f ? scale / softcap : scale);
  auto run = [&](auto* tag) {
    using KV = std::remove_pointer_t<decltype(tag)>;
    Chunk<KV> c{q.data_ptr<float>(), q.stride(0), static_cast<const KV*>(k.data_ptr()),
                static_cast<const KV*>(v.data_ptr()), k.stride(0), v.stride(0), slot_ptr, out.data_ptr<float>(),
                out.stride(0), n, H, KVH, D, start, window, q_scale, cap};
    attend_chunk(c);
  };
  if (k.scalar_type() == at::kHalf)
    run(static_cast<c10::Half*>(nullptr));
  else
    run(static_cast<float*>(nullptr));
}

}  // namespace

void register_prefill_attention(pybind11::module_& m) {
  m.def("prefill_attention", &prefill_attention, pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"),
        pybind11::arg("slots"), pybind11::arg("start"), pybind11::arg("window"), pybind11::arg("scale"),
        pybind11::arg("softcap"), pybind11::arg("out"),
        "Causal GQA attention of one prefill chunk: q [n, H, D] float32 at positions start.. against K/V [rows, "
        "KVH, D] (float32 or float16) at rows slots[p] for positions p < start + n (slots None: row p), within "
        "`window` (0: none), scores cap * tanh(s / cap) when softcap > 0; writes out [n, H, D].",
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
