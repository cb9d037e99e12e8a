// The whole decoder stack of a Llama-style model (and the Gemma 2/3, Qwen3 variants, see below) for one decode
// step (one new token for each sequence of the batch; fused_decode.py's MAX_FUSED_SEQS caps it) as a single C++
// call.
//
// Why: at batch 1 the eager layer is ~25 small torch ops; their dispatch (~9 ms over SmolLM2's 30 layers)
// costs more than reading 4-bit weights. Here each layer is a handful of loops over preallocated scratch plus
// four products (qkv, o, gate_up, down) and attention, shared by a team of threads inside one parallel region
// for the whole step (see forward).
//
// Per layer, for rows x[D, hidden] (the residual stream):
//   h = rms_norm(x) * w1; qkv = h W_qkv^T (+ bias); rotate q and k (rotary pairs adjacent, see rotary.py);
//   write k, v into the layer's cache at slot_mapping; per (sequence, q head): softmax(scale q.k) over the
//   cache slots the sequence sees (decode_gather where decode_mask) weighting v (GQA: q head h reads kv head
//   h / (H / KVH)); x += attn W_o^T;
//   h = rms_norm(x) * w2; gu = h W_gate_up^T; x += (silu(gate) * up) W_down^T.
// What varies by architecture (the layer's switches, set once at construction):
//   q/k norms (Qwen3, Gemma 3): every q and k head rms-normed over head_dim before rotary;
//   sandwich norms (Gemma): the attention output (after W_o) and the MLP output (after W_down) are rms-normed
//   before their residual adds (w2 is then Gemma's pre_feedforward_layernorm); norm weights arrive as applied
//   (Gemma's 1 + w), so no offset here;
//   activation: silu or gelu_tanh gating; attention softcap (Gemma 2): scores s -> cap * tanh(s / cap);
//   per layer, which rotation table it applies (none: -1) and which attention window's visible slots it reads.
// The stack's output is returned before the model's final norm, or after it when its weight is given.
// The KV cache is float32, float16 or bfloat16 (one dtype for every layer); attention computes in float32 either way.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <string>
#include <omp.h>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include "simd.h"
#endif

#include "qlinear.h"
#include "rowwise.h"
#include "vmath.h"

namespace {

// Visible slots per attention task (SmolLM2: 48 KiB of K for its 3 kv heads, which stays in L2 for the V pass).
constexpr int64_t kAttnChunk = 64;
// Rows from which a step's per-row parts (norms, rotary, merging attention, gating) split over the threads: below
// it (decode steps) they are too short to pay for the extra barriers.
constexpr int64_t kSplitRows = 16;
// Rows from which the team, not thread 0 alone, rounds a product's input (qweight_prepare_rows): a prompt's
// rounding (and, with AMX, its tile layout) was ~10-25% of a product done by one thread while the others waited.
constexpr int64_t kPrepareTeamRows = 24;
// Rows sharing their keys that attention takes chunk by chunk together (see build_visible).
constexpr int64_t kRowBlock = 8;

// Calls f with a null pointer of the cache's element type (float, c10::Half or c10::BFloat16).
template <typename F>
inline void with_kv_type(at::ScalarType t, const F& f) {
  if (t == at::kHalf)
    f(static_cast<c10::Half*>(nullptr));
  else if (t == at::kBFloat16)
    f(static_cast<c10::BFloat16*>(nullptr));
  else
    f(static_cast<float*>(nullptr));
}

struct AttnTask {
  int64_t d, j0, j1;  // sequence, visible slots [j0, j1), every kv head
};

// The portable attention chunk (no AVX2, or a head_dim that is not a multiple of 8; the vector path is below).

// sc[j] = scale * q . k_j for the rows k_j = k + vis[j] of a KV cache (j < n), each of length hd.
template <typename KV>
inline void qk_scores(const float* q, const KV* k, const int64_t* vis, int64_t n, int64_t hd, float scale,
                      float* sc) {
  for (int64_t j = 0; j < n; ++j) {
    const KV* row = k + vis[j];
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < hd; ++i) s += q[i] * kv_float(row[i]);
    sc[j] = s * scale;
  }
}

// out[hd] = inv * sum_j p[j] v_j for the rows v_j = v + vis[j] of a KV cache (j < n).
template <typename KV>
inline void weighted_rows(const float* p, const KV* v, const int64_t* vis, int64_t n, int64_t hd, float inv,
                          float* out) {
  std::fill(out, out + hd, 0.f);
  for (int64_t j = 0; j < n; ++j) {
    const KV* row = v + vis[j];
    const float pj = p[j];
#pragma omp simd
    for (int64_t i = 0; i < hd; ++i) out[i] += pj * kv_float(row[i]);
  }
#pragma omp simd
  for (int64_t i = 0; i < hd; ++i) out[i] *= inv;
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define JISU_ATTN_VEC 1
// ---- softmax on 8 lanes ----
// Its max was a scalar dependency chain and its exp did not vectorise: 8.7 -> 1.1 cycles per (slot, q head).

// s[0:n] <- e^(s - max s); mx = max s, sum = sum of the new s.
inline void softmax_exp(float* s, int64_t n, float& mx, float& sum) {
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(s + j));
  mx = hmax8(m);
  for (; j < n; ++j) mx = std::max(mx, s[j]);
  const __m256 mv = _mm256_set1_ps(mx);
  __m256 acc = _mm256_setzero_ps();
  j = 0;
  // Two exponentials at a time: each is a long chain of FMAs, and one alone waited on its own latency (a 4,096-token
  // prefill 537-558 -> 550-573 tok/s on the Xeon host). The sum still takes each 8 in turn (same order, same bits).
  for (; j + 16 <= n; j += 16) {
    const __m256 e0 = exp_clamped8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
    const __m256 e1 = exp_clamped8(_mm256_sub_ps(_mm256_loadu_ps(s + j + 8), mv));
    _mm256_storeu_ps(s + j, e0);
    _mm256_storeu_ps(s + j + 8, e1);
    acc = _mm256_add_ps(_mm256_add_ps(acc, e0), e1);
  }
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp_clamped8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
    _mm256_storeu_ps(s + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = hsum8(acc);
  for (; j < n; ++j) {
    s[j] = exp_clamped(s[j] - mx);
    sum += s[j];
  }
}

// ---- attention chunks that read each K/V row once, in slot order (head_dim % 8 == 0) ----
// Measured (one thread, SmolLM2's 9 q / 3 kv heads of 64, 30 layers x 1024 slots streamed from memory, ns per slot
// and layer): reading K a kv head at a time, 4 slots side by side (rows 768 B apart, 4 of 12 lines each), 96;
// whole rows in slot order 41 (the hardware prefetcher follows one forward stream; it lost the interleaved ones,
// and software prefetch did not bring them back). V likewise: per kv head, accumulators in registers 89; rows in
// order, accumulators in L1 47. Whole chunk 219 -> 91.
// Since then V is prefetched a row at a time while the scores read the same row of K (qk_rows' vpre), so its chunk
// is in L1 when the values are summed, and the V sums go a kv head at a time with their accumulators in registers
// (pv_heads_cached, the prompt rows' code): decode at a 4,000-token context 12.1 -> 9.8 ms a step, at 520 tokens
// 5.3 -> 4.9 (2 threads, alternating in one process, the same bits). Keeping the sums in registers without the
// prefetch gave about half of that.

// The K and V rows of the chunk a thread takes next, fetched into L2 a few lines at a time from inside this chunk's
// arithmetic. One thread streams at most ~12 GB/s from memory whatever it prefetches (measured on the Xeon host),
// so a chunk's first K pass is bound by reading and its other passes (scores of further heads, softmax, the V sums,
// all from cache) left the stream idle: about 40% of a decode step's attention at a 4,096-token context. Spread
// over those passes, the next chunk's reads overlap them.
struct ChunkPrefetch {
  const char* base[2] = {nullptr, nullptr};  // K, V cache of the layer
  const int64_t* vis = nullptr;              // the next chunk's row offsets (elements)
  int64_t n = 0, elem = 0, row_bytes = 0, per_call = 0;
  int64_t j = 0, part = 0;       // the row and part (K 0, V 1) after the current one
  uintptr_t line = 1, last = 0;  // the current part's next and last line (line > last: none left)

  // Fetch the n rows vis[0:n) (row_elems cache elements each) of caches k and v over `calls` calls of step().
  template <typename KV>
  void start(const KV* k, const KV* v, const int64_t* rows, int64_t count, int64_t row_elems, int64_t calls) {
    base[0] = reinterpret_cast<const char*>(k);
    base[1] = reinterpret_cast<const char*>(v);
    vis = rows;
    n = count;
    elem = static_cast<int64_t>(sizeof(KV));
    row_bytes = row_elems * elem;
    const int64_t lines = n * 2 * ((row_bytes + 63) / 64 + 1);  // + 1: a row may straddle one more line
    per_call = calls > 0 ? std::max<int64_t>(1, (lines + calls - 1) / calls) : lines;
  }

  // Fetches the next per_call lines (inlined: it runs once a row in the inner loops; as a call it was 3% of a
  // decode step).
  __attribute__((always_inline)) inline void step() {
    for (int64_t c = 0; c < per_call; ++c) {
      if (line > last) {
        if (j >= n) return;
        const uintptr_t row = reinterpret_cast<uintptr_t>(base[part] + vis[j] * elem);
        line = row >> 6;
        last = (row + row_bytes - 1) >> 6;
        if (++part == 2) part = 0, ++j;
      }
      _mm_prefetch(reinterpret_cast<const char*>(line++ << 6), _MM_HINT_T1);
    }
  }
  void finish() {
    while (j < n || line <= last) step();
  }
};

// The sums of 8 vectors' lanes, the sum of a_u in lane u; each lane's value depends on its own vector only.
inline __m256 sum_lanes8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6, __m256 a7) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
// Up to 8 q heads' scores against one key row: the 8 sums of a[0..NH) land in lanes 0..NH-1.
inline __m256 sum_lanes8(const __m256* a) { return sum_lanes8(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]); }

// s[h * ld + j] = scale * q_h . k_j for q heads h0 .. h0 + NH - 1 (head h reads kv head h / G of the row) over the
// n rows k + vis[j], each row once and in order; vpre (optional): prefetch the vbytes of row vpre + vis[j] too.
template <int NH, typename KV>
inline void qk_rows(const float* q, int64_t h0, int64_t G, int64_t hd, const KV* k, const int64_t* vis,
                    int64_t n, float scale, float* s, int64_t ld, const KV* vpre, int64_t vbytes,
                    ChunkPrefetch* next) {
  const __m256 sv = _mm256_set1_ps(scale);
  alignas(32) float out[8];
  for (int64_t j = 0; j < n; ++j) {
    const KV* row = k + vis[j];
    if (next) next->step();
    if (vpre) {
      const char* vrow = reinterpret_cast<const char*>(vpre + vis[j]);
      for (int64_t b = 0; b < vbytes; b += 64) _mm_prefetch(vrow + b, _MM_HINT_T0);
    }
    __m256 a[8];
    for (int u = 0; u < 8; ++u) a[u] = _mm256_setzero_ps();
    for (int64_t i = 0; i < hd; i += 8)
      for (int u = 0; u < NH; ++u)
        a[u] = _mm256_fmadd_ps(_mm256_loadu_ps(q + (h0 + u) * hd + i),
                               load_kv8(row + ((h0 + u) / G) * hd + i), a[u]);
    _mm256_store_ps(out, _mm256_mul_ps(sum_lanes8(a), sv));
    for (int u = 0; u < NH; ++u) s[(h0 + u) * ld + j] = out[u];
  }
}

// Scores of all H q heads, in passes of at most 8 heads of near-equal size (a lone head's chain of FMAs would
// wait on its own latency); the first pass prefetches the rows of v (null: none) at the same offsets, the later
// ones (from cache) the next chunk (null: none).
template <typename KV>
inline void qk_all_heads(const float* q, int64_t H, int64_t G, int64_t hd, const KV* k, const int64_t* vis,
                         int64_t n, float scale, float* s, int64_t ld, const KV* vpre, ChunkPrefetch* next) {
  const int64_t passes = (H + 7) / 8;
  const int64_t vbytes = (H / G) * hd * static_cast<int64_t>(sizeof(KV));
  for (int64_t p = 0, h0 = 0; p < passes; ++p) {
    const int64_t nh = (H - h0 + (passes - p) - 1) / (passes - p);
    const KV* pre = p == 0 ? vpre : nullptr;
    ChunkPrefetch* nx = p == 0 ? nullptr : next;
    switch (nh) {
      case 8: qk_rows<8, KV>(q, h0, G, hd, k, vis, n, scale, s, ld, pre, vbytes, nx); break;
      case 7: qk_rows<7, KV>(q, h0, G, hd, k, vis, n, scale, s, ld, pre, vbytes, nx); break;
      case 6: qk_rows<6, KV>(q, h0, G, hd, k, vis, n, scale, s, ld, pre, vbytes, nx); break;
      case 5: qk_rows<5, KV>(q, h0, G, hd, k, vis, n, scale, s, ld, pre, vbytes, nx); break;
      case 4: qk_rows<4, KV>(q, h0, G, hd, k, vis, n, scale, s, ld, pre, vbytes, nx); break;
      case 3: qk_rows<3, KV>(q, h0, G, hd, k, vis, n, scale, s, ld, pre, vbytes, nx); break;
      case 2: qk_rows<2, KV>(q, h0, G, hd, k, vis, n, scale, s, ld, pre, vbytes, nx); break;
      default: qk_rows<1, KV>(q, h0, G, hd, k, vis, n, scale, s, ld, pre, vbytes, nx); break;
    }
    h0 += nh;
  }
}

// ---- the same arithmetic for rows whose K/V chunk is already in cache (prompt rows of one sequence) ----
// qk_rows reads each K row once for all heads (decode: the cache streams from memory). Rows of a prompt share
// their keys, which a neighbouring row has just read, so there the loads of q and of the running
// sums cost more than memory: these take the q heads of one kv head, up to 3 at a time, against 4 keys (each
// key's sum the same FMA chain over the head's lanes and the same lane tree as qk_rows, so the same bits), and
// keep those heads' V sums in registers across the chunk (each element the same FMA chain over the keys in order).
// Each key and value row is widened to float32 once for the heads together: taking one head at a time (each
// widening every row again) measured 6-14% slower on a 4,096-token deterministic prefill (float16 cache, SmolLM2's
// 3 q heads per kv head: 162 vs 172-185 tok/s, 2 threads), the same bits.
template <int NH, typename KV>
inline void qk_heads_cached(const float* q, int64_t hd, const KV* k, const int64_t* vis, int64_t n, float scale,
                            float* s, int64_t ld) {
  const __m256 sv = _mm256_set1_ps(scale);
  alignas(32) float out[8];
  for (int64_t j = 0; j < n; j += 4) {
    const int64_t m = std::min<int64_t>(4, n - j);
    const KV* r[4] = {k + vis[j], k + vis[j + (m > 1)], k + vis[j + (m > 2 ? 2 : 0)], k + vis[j + (m > 3 ? 3 : 0)]};
    __m256 a[NH + 1][4];  // a[NH]: zeros, the partner of an odd head out below
#pragma GCC unroll 4
    for (int h = 0; h <= NH; ++h)
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) a[h][u] = _mm256_setzero_ps();
    for (int64_t i = 0; i < hd; i += 8)
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) {
        const __m256 kv = load_kv8(r[u] + i);
#pragma GCC unroll 4
        for (int h = 0; h < NH; ++h) a[h][u] = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * hd + i), kv, a[h][u]);
      }
    // Two heads' 4 keys per lane tree (lanes 0-3 head h, 4-7 head h + 1): half the trees of one head each.
#pragma GCC unroll 4
    for (int h = 0; h < NH; h += 2) {
      const __m256* b = a[h + 1 < NH ? h + 1 : NH];
      _mm256_store_ps(out, _mm256_mul_ps(sum_lanes8(a[h][0], a[h][1], a[h][2], a[h][3], b[0], b[1], b[2], b[3]), sv));
      for (int64_t u = 0; u < m; ++u) s[h * ld + j + u] = out[u];
      if (h + 1 < NH)
        for (int64_t u = 0; u < m; ++u) s[(h + 1) * ld + j + u] = out[4 + u];
    }
  }
}

// The vector widths the V sums come in: 8 lanes, and 16 in the avx512 set (each lane one column, its FMA chain over
// the keys in order, so both widths give the same bits).
struct Lanes8 {
  using V = __m256;
  static constexpr int64_t kLanes = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V splat(const float* p) { return _mm256_broadcast_ss(p); }
  template <typename KV>
  static V load(const KV* p) { return load_kv8(p); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
};

#if defined(__AVX512F__)
#define JISU_ATTN_512 1
// ---- the V sums 512 bits wide (the avx512 kernel set), the same bits ----
// Measured on the Xeon host (in place, TSC cycles a thread spent in the V sums of a 4,096-token prefill): 5.5G ->
// 4.4G; in isolation a chunk's sums (64 keys, 9 heads) took 3,440 -> 1,514. The scores stay 256 bits wide: a
// 512-bit form (two keys a vector) was no faster, as its widening of float16 and its lane trees take the same two
// ports as 512-bit FMAs; widening a chunk once to float32 for the rows that share it was slower still (the float32
// copy doubled the chunk's L2 traffic: 4,096-token prefill 491 -> 363 tok/s, and 464 -> 416 widening K alone).

// 16 cache elements as float32 lanes (float16: exact; bfloat16: shifted into place).
inline __m512 load_kv16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 widen_kv16(__m256i h, c10::Half*) { return _mm512_cvtph_ps(h); }
inline __m512 widen_kv16(__m256i h, c10::BFloat16*) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
template <typename KV>
inline __m512 load_kv16(const KV* p) {
  return widen_kv16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), static_cast<KV*>(nullptr));
}
struct Lanes16 {
  using V = __m512;
  static constexpr int64_t kLanes = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V splat(const float* p) { return _mm512_set1_ps(*p); }
  template <typename KV>
  static V load(const KV* p) { return load_kv16(p); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
};
#else
#define JISU_ATTN_512 0
#endif

// W (1-4) vectors of columns from c0: the width is a template argument so that the NH x W sums stay in registers
// (with a run-time width GCC kept them on the stack, a store and a reload per FMA).
template <class L, int NH, int W, typename KV>
inline void pv_columns_cached(const float* p, int64_t ld, const KV* v, const int64_t* vis, int64_t n, int64_t c0,
                              float* acc, int64_t acc_stride, ChunkPrefetch* next) {
  typename L::V a[NH][W];
#pragma GCC unroll 4
  for (int h = 0; h < NH; ++h)
#pragma GCC unroll 4
    for (int u = 0; u < W; ++u) a[h][u] = L::zero();
  for (int64_t j = 0; j < n; ++j) {
    const KV* x = v + vis[j] + c0;
    if (next) next->step();
    typename L::V pj[NH];
#pragma GCC unroll 4
    for (int h = 0; h < NH; ++h) pj[h] = L::splat(p + h * ld + j);
#pragma GCC unroll 4
    for (int u = 0; u < W; ++u) {
      const typename L::V kv = L::load(x + L::kLanes * u);
#pragma GCC unroll 4
      for (int h = 0; h < NH; ++h) a[h][u] = L::fma(pj[h], kv, a[h][u]);
    }
  }
#pragma GCC unroll 4
  for (int h = 0; h < NH; ++h)
#pragma GCC unroll 4
    for (int u = 0; u < W; ++u) L::store(acc + h * acc_stride + c0 + L::kLanes * u, a[h][u]);
}

template <class L, int NH, typename KV>
inline void pv_heads_cached(const float* p, int64_t ld, int64_t hd, const KV* v, const int64_t* vis, int64_t n,
                            float* acc, int64_t acc_stride, ChunkPrefetch* next) {
  constexpr int64_t kBlock = 4 * L::kLanes;
  for (int64_t c0 = 0; c0 < hd; c0 += kBlock) {
    switch (std::min<int64_t>(kBlock, hd - c0) / L::kLanes) {
      case 4: pv_columns_cached<L, NH, 4, KV>(p, ld, v, vis, n, c0, acc, acc_stride, next); break;
      case 3: pv_columns_cached<L, NH, 3, KV>(p, ld, v, vis, n, c0, acc, acc_stride, next); break;
      case 2: pv_columns_cached<L, NH, 2, KV>(p, ld, v, vis, n, c0, acc, acc_stride, next); break;
      default: pv_columns_cached<L, NH, 1, KV>(p, ld, v, vis, n, c0, acc, acc_stride, next); break;
    }
  }
}


// pv_heads_cached for a run-time number of heads (1-3).
template <class L, typename KV>
inline void pv_heads_of_width(int64_t nh, const float* p, int64_t ld, int64_t hd, const KV* v, const int64_t* vis,
                              int64_t n, float* acc, int64_t acc_stride, ChunkPrefetch* next) {
  switch (nh) {
    case 3: pv_heads_cached<L, 3, KV>(p, ld, hd, v, vis, n, acc, acc_stride, next); break;
    case 2: pv_heads_cached<L, 2, KV>(p, ld, hd, v, vis, n, acc, acc_stride, next); break;
    default: pv_heads_cached<L, 1, KV>(p, ld, hd, v, vis, n, acc, acc_stride, next); break;
  }
}
// The same, 16 lanes wide where the kernel set has them and head_dim allows.
template <typename KV>
inline void pv_heads_in_cache(int64_t nh, const float* p, int64_t ld, int64_t hd, const KV* v, const int64_t* vis,
                              int64_t n, float* acc, int64_t acc_stride, ChunkPrefetch* next = nullptr) {
#if JISU_ATTN_512
  if (hd % 16 == 0) return pv_heads_of_width<Lanes16>(nh, p, ld, hd, v, vis, n, acc, acc_stride, next);
#endif
  pv_heads_of_width<Lanes8>(nh, p, ld, hd, v, vis, n, acc, acc_stride, next);
}

// How often a decode row's passes from cache call ChunkPrefetch::step per key of its chunk: the score passes after
// the first (qk_all_heads), and the V sums of each group of up to 3 q heads and each column block
// (pv_heads_in_cache).
inline int64_t steps_per_key(int64_t H, int64_t G, int64_t hd) {
  const int64_t columns = JISU_ATTN_512 && hd % 16 == 0 ? 64 : 32;
  return (H + 7) / 8 - 1 + (H / G) * ((G + 2) / 3) * ((hd + columns - 1) / columns);
}

// qk_heads_cached for a run-time number of heads (1-3).
template <typename KV>
inline void qk_heads_in_cache(int64_t nh, const float* q, int64_t hd, const KV* k, const int64_t* vis, int64_t n,
                              float scale, float* s, int64_t ld) {
  switch (nh) {
    case 3: qk_heads_cached<3, KV>(q, hd, k, vis, n, scale, s, ld); break;
    case 2: qk_heads_cached<2, KV>(q, hd, k, vis, n, scale, s, ld); break;
    default: qk_heads_cached<1, KV>(q, hd, k, vis, n, scale, s, ld); break;
  }
}
#else
#define JISU_ATTN_VEC 0
#endif

// Per-thread attention scratch: the scores of every q head for one chunk.
struct AttnScratch {
  std::vector<float> sc;
};
AttnScratch& attn_scratch() {
  thread_local AttnScratch s;
  return s;
}

struct Layer {
  at::Tensor input_norm, mlp_norm;         // float32 [hidden], contiguous: before attention, before the MLP
  at::Tensor attn_out_norm, mlp_out_norm;  // sandwich norms after attention / the MLP (undefined: none)
  at::Tensor q_norm, k_norm;               // float32 [head_dim] per-head norms (undefined: none)
  int64_t rotation, window;                // index into forward's rotations (-1: no RoPE) and windows
  QWeight qkv, o, gate_up, down;
};

// The slots the sequences of a step see under one attention window, and its attention work items.
struct Visible {
  int64_t ctx = 0;                     // columns of decode_gather / decode_mask
  std::vector<int64_t> slots, count;   // per sequence: row offsets into a cache (ctx apart), how many
  std::vector<uint8_t> shares_keys;    // per row: a neighbour reads the same keys (attention_tasks)
  std::vector<AttnTask> tasks;         // (sequence, chunk of visible slots), in that order
  std::vector<int64_t> first_task;     // per sequence, its first task; [D] = tasks.size()
  std::vector<int64_t> order;          // the tasks in the order the threads take them (attention_tasks)
};

class FusedDecoder {
 public:
  FusedDecoder(std::vector<at::Tensor> input_norms, std::vector<QWeight> qkv, std::vector<QWeight> o,
               std::vector<at::Tensor> mlp_norms, std::vector<QWeight> gate_up, std::vector<QWeight> down,
               double eps, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t intermediate_size,
               double scale, std::vector<at::Tensor> attn_out_norms, std::vector<at::Tensor> mlp_out_norms,
               std::vector<at::Tensor> q_norms, std::vector<at::Tensor> k_norms, const std::string& activation,
               double attn_softcap, std::vector<int64_t> layer_rotation, std::vector<int64_t> layer_window)
      : eps_(static_cast<float>(eps)),
        H_(num_heads),
        KVH_(num_kv_heads),
        hd_(head_dim),
        I_(intermediate_size),
        scale_(static_cast<float>(scale)),
        softcap_(static_cast<float>(attn_softcap)) {
    const size_t L = input_norms.size();
    TORCH_CHECK(L > 0, "FusedDecoder needs at least one layer");
    TORCH_CHECK(qkv.size() == L && o.size() == L && mlp_norms.size() == L && gate_up.size() == L &&
                    down.size() == L,
                "FusedDecoder: every per-layer list must have ", L, " entries");
    for (const auto* v : {&attn_out_norms, &mlp_out_norms, &q_norms, &k_norms})
      TORCH_CHECK(v->empty() || v->size() == L, "FusedDecoder: optional norm lists must be empty or have ", L,
                  " entries");
    TORCH_CHECK(attn_out_norms.size() == mlp_out_norms.size(), "sandwich norms come in pairs (attention, MLP)");
    TORCH_CHECK(q_norms.size() == k_norms.size(), "q and k norms come together");
    TORCH_CHECK(layer_rotation.empty() || layer_rotation.size() == L, "layer_rotation must have ", L, " entries");
    TORCH_CHECK(layer_window.empty() || layer_window.size() == L, "layer_window must have ", L, " entries");
    TORCH_CHECK(activation == "silu" || activation == "gelu_tanh", "activation must be silu or gelu_tanh, got ",
                activation);
    act_ = activation == "silu" ? Act::Silu : Act::GeluTanh;
    TORCH_CHECK(attn_softcap >= 0 && std::isfinite(attn_softcap), "attn_softcap must be >= 0 (0: none)");
    TORCH_CHECK(H_ > 0 && KVH_ > 0 && H_ % KVH_ == 0, "num_heads (", H_, ") must be a multiple of num_kv_heads (",
                KVH_, ")");
    TORCH_CHECK(hd_ > 0 && hd_ % 2 == 0, "head_dim must be even, got ", hd_);
    hidden_ = input_norms[0].numel();
    qkvN_ = (H_ + 2 * KVH_) * hd_;
    for (size_t l = 0; l < L; ++l) {
      auto norm = [&](const std::vector<at::Tensor>& v, int64_t size, const char* what) {
        if (v.empty()) return at::Tensor();
        const at::Tensor& t = v[l];
        TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.numel() == size, "layer ", l,
                    ": ", what, " must be float32 [", size, "] on CPU");
        return t.contiguous();
      };
      auto shape = [&](const QWeight& w, int64_t N, int64_t K, const char* what) {
        TORCH_CHECK(w.N == N && w.K == K, "layer ", l, ": ", what, " is [", w.N, ", ", w.K, "], expected [", N,
                    ", ", K, "]");
      };
      shape(qkv[l], qkvN_, hidden_, "qkv_proj");
      shape(o[l], hidden_, H_ * hd_, "o_proj");
      shape(gate_up[l], 2 * I_, hidden_, "gate_up_proj");
      shape(down[l], hidden_, I_, "down_proj");
      const int64_t rotation = layer_rotation.empty() ? 0 : layer_rotation[l];
      const int64_t window = layer_window.empty() ? 0 : layer_window[l];
      TORCH_CHECK(rotation >= -1 && window >= 0, "layer ", l, ": rotation index must be >= -1, window index >= 0");
      num_rotations_ = std::max(num_rotations_, rotation + 1);
      num_windows_ = std::max(num_windows_, window + 1);
      layers_.push_back(Layer{norm(input_norms, hidden_, "input_layernorm"), norm(mlp_norms, hidden_, "MLP norm"),
                              norm(attn_out_norms, hidden_, "post_attention_layernorm"),
                              norm(mlp_out_norms, hidden_, "post_feedforward_layernorm"),
                              norm(q_norms, hd_, "q_norm"), norm(k_norms, hd_, "k_norm"), rotation, window, qkv[l],
                              o[l], gate_up[l], down[l]});
    }
  }

  // Scratch for D sequences (grown on first need, kept: one decoder serves one engine's steps).
  void reserve(int64_t D) {
    if (D <= capacity_) return;
    h_.resize(D * std::max(hidden_, I_));
    qkv_.resize(D * qkvN_);
    attn_.resize(D * H_ * hd_);
    proj_.resize(D * hidden_);
    gu_.resize(D * 2 * I_);
    capacity_ = D;
  }

  at::Tensor forward(const at::Tensor& x_in, const std::vector<at::Tensor>& rotations_in,
                     const std::vector<at::Tensor>& gathers_in, const std::vector<at::Tensor>& masks_in,
                     const at::Tensor& slot_mapping_in, const std::vector<at::Tensor>& k_caches,
                     const std::vector<at::Tensor>& v_caches, const c10::optional<at::Tensor>& final_norm,
                     double final_eps) {
    std::lock_guard<std::mutex> guard(mutex_);  // one set of scratch buffers
    // (no copies when already contiguous, as the runner's tensors are)
    const at::Tensor x = x_in.contiguous(), slot_mapping = slot_mapping_in.contiguous();
    const int64_t L = static_cast<int64_t>(layers_.size());
    TORCH_CHECK(x.dim() == 2 && x.size(1) == hidden_ && x.scalar_type() == at::kFloat && x.device().is_cpu(),
                "x must be float32 [D, ", hidden_, "] on CPU");
    const int64_t D = x.size(0);
    TORCH_CHECK(D >= 1, "FusedDecoder needs at least one sequence");
    reserve(D);
    const float* norm_w = nullptr;
    if (final_norm.has_value() && final_norm->defined()) {
      TORCH_CHECK(final_norm->scalar_type() == at::kFloat && final_norm->is_contiguous() &&
                      final_norm->numel() == hidden_ && final_norm->device().is_cpu(),
                  "final_norm must be a contiguous float32 [", hidden_, "] CPU tensor");
      norm_w = final_norm->data_ptr<float>();
    }
    TORCH_CHECK(static_cast<int64_t>(rotations_in.size()) >= num_rotations_, "expected ", num_rotations_,
                " rotation tables, got ", rotations_in.size());
    std::vector<at::Tensor> rotations;
    for (const at::Tensor& r : rotations_in) {
      TORCH_CHECK(r.scalar_type() == at::kFloat && r.numel() == D * hd_ && r.device().is_cpu(),
                  "each rotation must be float32 [D, head_dim/2, 2] (cos, sin) on CPU");
      rotations.push_back(r.contiguous());
    }
    TORCH_CHECK(static_cast<int64_t>(gathers_in.size()) >= num_windows_ && gathers_in.size() == masks_in.size(),
                "expected ", num_windows_, " (decode_gather, decode_mask) pairs, got ", gathers_in.size(), " and ",
                masks_in.size());
    TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.numel() == D && slot_mapping.device().is_cpu(),
                "slot_mapping must be int64 [D] on CPU");
    TORCH_CHECK(static_cast<int64_t>(k_caches.size()) == L && static_cast<int64_t>(v_caches.size()) == L,
                "expected ", L, " K and V caches");
    int64_t num_slots = std::numeric_limits<int64_t>::max();
    const at::ScalarType kv_type = k_caches[0].scalar_type();
    TORCH_CHECK(kv_type == at::kFloat || kv_type == at::kHalf || kv_type == at::kBFloat16,
                "KV caches must be float32, float16 or bfloat16, got ", kv_type);
    for (int64_t l = 0; l < L; ++l) {
      for (const at::Tensor* c : {&k_caches[l], &v_caches[l]}) {
        TORCH_CHECK(c->scalar_type() == kv_type && c->is_contiguous() && c->dim() == 3 && c->size(1) == KVH_ &&
                        c->size(2) == hd_ && c->device().is_cpu(),
                    "layer ", l, ": KV caches must be contiguous [slots, ", KVH_, ", ", hd_, "] on CPU, all ",
                    kv_type);
        num_slots = std::min(num_slots, c->size(0));
      }
    }
    const int64_t* sm = slot_mapping.data_ptr<int64_t>();
    for (int64_t d = 0; d < D; ++d) {
      TORCH_CHECK(sm[d] >= 0 && sm[d] < num_slots, "slot_mapping slot ", sm[d], " outside the cache");
    }
    // The slots each sequence attends under each window: compacted once a step, shared by that window's layers.
    vis_.resize(num_windows_);
    size_t most_tasks = 0;
    for (int64_t w = 0; w < num_windows_; ++w) {
      build_visible(gathers_in[w].contiguous(), masks_in[w].contiguous(), D, num_slots, vis_[w]);
      most_tasks = std::max(most_tasks, vis_[w].tasks.size());
    }
    partial_.resize(most_tasks * H_ * (hd_ + 2));

    at::Tensor out = x.clone();  // the residual stream
    float* res = out.data_ptr<float>();
    float* h = h_.data();
    float* qkv = qkv_.data();
    float* attn = attn_.data();
    float* proj = proj_.data();
    float* gu = gu_.data();

    // NOTE: one parallel region for the whole stack. Each product and the attention split over the team, and
    // the short per-row parts (norms, rotary, K/V writes, merging attention chunks, the gated activation) run on
    // thread 0 between barriers, or, from kSplitRows rows on (prompt groups), on each thread's own share of the
    // rows (the same operations per row, so the same bits); thread 0 alone rounds the next product's input. A
    // fork/join per product (at::parallel_for) measured ~2.4 us of starting and joining each time in a real step,
    // ~150 times a step (a barrier: ~0.3 us); the one region measured 3% less time for the int4 stack (2 threads,
    // SmolLM2, 10 alternations, same bits).
    MatvecInput in{};  // the next product's input: written by thread 0, read by all after a barrier
    const int T = std::max(1, at::get_num_threads());
    const bool split = D >= kSplitRows;
#pragma omp parallel num_threads(T)
    {
      const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
      // This thread's rows of the per-row parts: all of them on thread 0 (none elsewhere) below kSplitRows.
      const int64_t per = split ? (D + nt - 1) / nt : D;
      const int64_t d0 = split ? std::min(D, tid * per) : (tid == 0 ? 0 : D);
      const int64_t d1 = split ? std::min(D, d0 + per) : D;
      // After per-row work that another thread reads whole (a product's input, attention's q/k/v).
      auto rows_done = [&]() {
        if (split) {
#pragma omp barrier
        }
      };
      // y = x W^T by the whole team: thread 0 prepares x (after its own serial work), each thread computes its
      // share of the rows; all of y is there after.
      auto product = [&](const QWeight& w, const float* x_in, float* y) {
        if (D >= kPrepareTeamRows) {
          if (tid == 0) in = qweight_prepare_begin(w, x_in, D);
#pragma omp barrier
          const int64_t per = (D + nt - 1) / nt;
          qweight_prepare_rows(w, in, std::min(D, tid * per), std::min(D, (tid + 1) * per));
        } else if (tid == 0) {
          in = qweight_prepare(w, x_in, D);
        }
#pragma omp barrier
        qweight_rows(w, in, y, tid, nt);
#pragma omp barrier
      };
      // res += y for this thread's rows, through the sandwich norm `w` first when the layer has one (y is
      // scratch, normed in place).
      auto residual_add = [&](const at::Tensor& w, float* y) {
        for (int64_t d = d0; d < d1; ++d) {
          if (w.defined()) rms_norm(y + d * hidden_, w.data_ptr<float>(), hidden_, eps_, y + d * hidden_);
          float* r = res + d * hidden_;
          const float* yd = y + d * hidden_;
#pragma omp simd
          for (int64_t i = 0; i < hidden_; ++i) r[i] += yd[i];
        }
      };
      for (int64_t l = 0; l < L; ++l) {
        const Layer& ly = layers_[l];
        const Visible& vis = vis_[ly.window];
        void* kc = k_caches[l].data_ptr();
        void* vc = v_caches[l].data_ptr();
        for (int64_t d = d0; d < d1; ++d)
          rms_norm(res + d * hidden_, ly.input_norm.data_ptr<float>(), hidden_, eps_, h + d * hidden_);
        rows_done();
        product(ly.qkv, h, qkv);
        {
          const float* rot = ly.rotation < 0 ? nullptr : rotations[ly.rotation].data_ptr<float>();
          with_kv_type(kv_type, [&](auto* tag) {
            using KV = std::remove_pointer_t<decltype(tag)>;
            rotate_and_cache(d0, d1, ly, qkv, rot, sm, static_cast<KV*>(kc), static_cast<KV*>(vc));
          });
        }
#pragma omp barrier
        with_kv_type(kv_type, [&](auto* tag) {
          using KV = std::remove_pointer_t<decltype(tag)>;
          attention_tasks(tid, nt, vis, qkv, static_cast<const KV*>(kc), static_cast<const KV*>(vc));
        });
#pragma omp barrier
        merge_attention(d0, d1, vis, attn);
        rows_done();
        product(ly.o, attn, proj);
        residual_add(ly.attn_out_norm, proj);
        for (int64_t d = d0; d < d1; ++d)
          rms_norm(res + d * hidden_, ly.mlp_norm.data_ptr<float>(), hidden_, eps_, h + d * hidden_);
        rows_done();
        product(ly.gate_up, h, gu);
        gated_act(d0, d1, gu, h);  // h is free again until the next norm; [D, I] fits (max(hidden, I))
        rows_done();
        product(ly.down, h, proj);
        residual_add(ly.mlp_out_norm, proj);  // the next layer's norm reads only this thread's rows of res
      }
    }
    if (norm_w)  // the model's final norm, in place (torch's rms_norm right after this call cost ~70 us)
      for (int64_t d = 0; d < D; ++d)
        rms_norm(res + d * hidden_, norm_w, hidden_, static_cast<float>(final_eps), res + d * hidden_);
    return out;
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

 private:
  // v.slots / count: the visible slots of every sequence (decode_gather where decode_mask), as row offsets into a
  // cache; then its attention tasks.
  void build_visible(const at::Tensor& gather, const at::Tensor& mask, int64_t D, int64_t num_slots, Visible& v) {
    TORCH_CHECK(gather.scalar_type() == at::kLong && gather.dim() == 2 && gather.size(0) == D && gather.device().is_cpu(),
                "decode_gather must be int64 [D, max_ctx] on CPU");
    const int64_t ctx = gather.size(1);
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.numel() == D * ctx && mask.device().is_cpu(),
                "decode_mask must be bool with D * max_ctx elements ([D, max_ctx] or [D, 1, 1, max_ctx]) on CPU");
    const int64_t row = KVH_ * hd_;
    v.ctx = ctx;
    v.slots.resize(D * ctx);
    v.count.assign(D, 0);
    const int64_t* gp = gather.data_ptr<int64_t>();
    const bool* mp = mask.data_ptr<bool>();
    for (int64_t d = 0; d < D; ++d) {
      int64_t c = 0;
      for (int64_t j = 0; j < ctx; ++j) {
        if (!mp[d * ctx + j]) continue;
        const int64_t s = gp[d * ctx + j];
        TORCH_CHECK(s >= 0 && s < num_slots, "decode_gather slot ", s, " outside the cache (", num_slots, " slots)");
        v.slots[d * ctx + c++] = s * row;
      }
      v.count[d] = c;
    }
    // Rows whose first visible slot a neighbour also reads are prompt rows of one sequence: their keys stay in
    // cache. (A sliding window moves the first slot on by one a row: the neighbour's second.)
    v.shares_keys.assign(D, 0);
    std::vector<uint8_t> joins(D, 0);  // row d reads its predecessor's keys
    for (int64_t d = 1; d < D; ++d) {
      const int64_t* a = v.slots.data() + (d - 1) * ctx;
      const int64_t first = v.slots[d * ctx];
      if (v.count[d] > 0 && v.count[d - 1] > 0 && (first == a[0] || (v.count[d - 1] > 1 && first == a[1])))
        joins[d] = v.shares_keys[d] = v.shares_keys[d - 1] = 1;
    }
    // Attention work items: (sequence, chunk of kAttnChunk visible slots), in that order.
    v.tasks.clear();
    v.first_task.assign(D + 1, 0);
    // Short contexts get smaller chunks (down to 16 slots), so that even one sequence splits over the threads.
    const int64_t spread = 2 * static_cast<int64_t>(at::get_num_threads());
    for (int64_t d = 0; d < D; ++d) {
      v.first_task[d] = static_cast<int64_t>(v.tasks.size());
      const int64_t chunk = std::clamp<int64_t>((v.count[d] + spread - 1) / spread, 16, kAttnChunk);
      for (int64_t j0 = 0; j0 < v.count[d]; j0 += chunk)
        v.tasks.push_back(AttnTask{d, j0, std::min(v.count[d], j0 + chunk)});
    }
    v.first_task[D] = static_cast<int64_t>(v.tasks.size());
    // NOTE (order): rows that read the same keys (a prompt's rows, a verify's) go kRowBlock at a time, chunk by
    // chunk: the block's rows use a chunk one after another (read from memory once for them, then from cache), and
    // the threads' equal runs of this order split a few rows' chunks between them instead of giving each thread
    // whole rows, each reading the whole cache. Every other row keeps its chunks in slot order (a decode row
    // streams its cache from memory). Only the order changes: a task writes its own partial, so the bits are the
    // same.
    v.order.clear();
    for (int64_t d = 0; d < D;) {
      int64_t de = d + 1, chunks = v.first_task[d + 1] - v.first_task[d];
      for (; de < D && de < d + kRowBlock && joins[de]; ++de)
        chunks = std::max(chunks, v.first_task[de + 1] - v.first_task[de]);
      for (int64_t c = 0; c < chunks; ++c)
        for (int64_t r = d; r < de; ++r)
          if (v.first_task[r] + c < v.first_task[r + 1]) v.order.push_back(v.first_task[r] + c);
      d = de;
    }
  }

  // The layer's q and k norms (per head) and rotary (pairs adjacent, see rotary.py; none when rot is null) on the
  // q and k heads of rows [d0, d1), then those rows' k and v into the layer's cache at their slots (float16 and
  // bfloat16 round to nearest even, as torch's .to()).
  template <typename KV>
  void rotate_and_cache(int64_t d0, int64_t d1, const Layer& ly, float* qkv, const float* rot, const int64_t* sm,
                        KV* kc, KV* vc) const {
    const int64_t row = KVH_ * hd_;
    const float* qn = ly.q_norm.defined() ? ly.q_norm.data_ptr<float>() : nullptr;
    const float* kn = ly.k_norm.defined() ? ly.k_norm.data_ptr<float>() : nullptr;
    for (int64_t d = d0; d < d1; ++d) {
      float* q = qkv + d * qkvN_;
      for (int64_t head = 0; head < H_ + KVH_; ++head) {  // q heads, then k heads
        float* p = q + head * hd_;
        if (qn) rms_norm(p, head < H_ ? qn : kn, hd_, eps_, p);
        if (!rot) continue;
        const float* cs = rot + d * hd_;
#pragma omp simd
        for (int64_t i = 0; i < hd_ / 2; ++i) {
          const float a = p[2 * i], b = p[2 * i + 1], c = cs[2 * i], s = cs[2 * i + 1];
          p[2 * i] = a * c - b * s;
          p[2 * i + 1] = a * s + b * c;
        }
      }
      const float* k = q + H_ * hd_;
      const float* v = k + KVH_ * hd_;
      if constexpr (std::is_same_v<KV, float>) {
        std::memcpy(kc + sm[d] * row, k, row * sizeof(float));
        std::memcpy(vc + sm[d] * row, v, row * sizeof(float));
      } else {
        for (int64_t i = 0; i < row; ++i) {
          kc[sm[d] * row + i] = KV(k[i]);
          vc[sm[d] * row + i] = KV(v[i]);
        }
      }
    }
  }

  // a[d] = act(gate) * up for rows d in [d0, d1), gu[d] = (gate, up) (rowwise.h, as the eager layers compute it).
  void gated_act(int64_t d0, int64_t d1, const float* gu, float* a_out) const {
    for (int64_t d = d0; d < d1; ++d) gated_act_row(act_, gu + d * 2 * I_, gu + d * 2 * I_ + I_, I_, a_out + d * I_);
  }

  // attn[d, h*hd:(h+1)*hd] = softmax_j(scale * q.k_j) v_j over the visible slots j of sequence d, in two parts:
  // attention_tasks (thread `tid` of `nt` takes an equal run of the tasks in vis.order) and merge_attention.
  // With a softcap, the scores are cap * tanh(scale / cap * q.k_j) (Gemma 2; eager attention's arithmetic).
  //
  // NOTE: split like flash-decoding: each task takes one chunk of a sequence's slots for every q head, so every
  // K/V row is read from memory once per layer, whole and in slot order (at long contexts attention is bound by
  // reading the float32 cache; see qk_rows for how the order of reads decided the speed), and the work divides
  // between threads even at batch 1.
  // A task leaves, per q head, its chunk's max score m, sum of e^(s - m) and unnormalised e^(s - m)-weighted
  // sum of v; the chunks of a (sequence, head) are then merged exactly (rescaled to the common max).
  template <typename KV>
  void attention_tasks(int tid, int nt, const Visible& vis_w, const float* qkv, const KV* kc, const KV* vc) {
    const int64_t G = H_ / KVH_, stride = hd_ + 2, ctx = vis_w.ctx;
    const int64_t ntasks = static_cast<int64_t>(vis_w.tasks.size()), per = (ntasks + nt - 1) / nt;
    const int64_t t0 = std::min(ntasks, tid * per), t1 = std::min(ntasks, (tid + 1) * per);
    if (t0 >= t1) return;
    const bool capped = softcap_ > 0.f;
    const float scale = capped ? scale_ / softcap_ : scale_;
    AttnScratch& scr = attn_scratch();
    if (static_cast<int64_t>(scr.sc.size()) < H_ * kAttnChunk) scr.sc.resize(H_ * kAttnChunk);
    float* sc = scr.sc.data();
    auto run = [&](int64_t t, int64_t t_next) {
      const AttnTask& task = vis_w.tasks[t];
      const int64_t n = task.j1 - task.j0;
      const int64_t* vis = vis_w.slots.data() + task.d * ctx + task.j0;
#if JISU_ATTN_VEC
      if (hd_ % 8 == 0) {
        const float* q = qkv + task.d * qkvN_;
        float* part = partial_.data() + t * H_ * stride;
        // A decode row streams its K rows once for every head (prefetching V); rows whose keys a neighbour has
        // just read take one kv head's q heads at a time (see the prompt rows' code above).
        const bool in_cache = vis_w.shares_keys[task.d];
        // A decode row followed by another decode row's chunk fetches that chunk during its passes from cache.
        ChunkPrefetch next;
        ChunkPrefetch* pf = nullptr;
        if (!in_cache && t_next >= 0 && !vis_w.shares_keys[vis_w.tasks[t_next].d]) {
          const AttnTask& following = vis_w.tasks[t_next];
          next.start(kc, vc, vis_w.slots.data() + following.d * ctx + following.j0, following.j1 - following.j0,
                     KVH_ * hd_, n * steps_per_key(H_, G, hd_));
          pf = &next;
        }
        if (!in_cache) qk_all_heads(q, H_, G, hd_, kc, vis, n, scale, sc, kAttnChunk, vc, pf);
        for (int64_t h0 = 0; h0 < H_;) {  // up to 3 q heads of one kv head at a time
          const int64_t nh = std::min<int64_t>(3, std::min(H_, (h0 / G + 1) * G) - h0), g = h0 / G;
          if (in_cache)
            qk_heads_in_cache(nh, q + h0 * hd_, hd_, kc + g * hd_, vis, n, scale, sc + h0 * kAttnChunk, kAttnChunk);
          for (int64_t h = h0; h < h0 + nh; ++h) {
            if (capped) softcap_scores(sc + h * kAttnChunk, n, softcap_);
            softmax_exp(sc + h * kAttnChunk, n, part[h * stride + hd_], part[h * stride + hd_ + 1]);
          }
          pv_heads_in_cache(nh, sc + h0 * kAttnChunk, kAttnChunk, hd_, vc + g * hd_, vis, n, part + h0 * stride,
                            stride, pf);
          h0 += nh;
        }
        if (pf) pf->finish();
        return;
      }
#endif
      for (int64_t h = 0; h < H_; ++h) {
        const int64_t koff = (h / G) * hd_;
        const float* q = qkv + task.d * qkvN_ + h * hd_;
        float* part = partial_.data() + (t * H_ + h) * stride;
        qk_scores(q, kc + koff, vis, n, hd_, scale, sc);
        if (capped) softcap_scores(sc, n, softcap_);
        float mx = sc[0];
        for (int64_t j = 1; j < n; ++j) mx = std::max(mx, sc[j]);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < n; ++j) {
          sc[j] = exp_clamped(sc[j] - mx);
          sum += sc[j];
        }
        weighted_rows(sc, vc + koff, vis, n, hd_, 1.f, part);
        part[hd_] = mx;
        part[hd_ + 1] = sum;
      }
    };
    for (int64_t i = t0; i < t1; ++i) run(vis_w.order[i], i + 1 < t1 ? vis_w.order[i + 1] : -1);
  }

  // Merge the chunks of each (row, q head) for rows [d0, d1).
  void merge_attention(int64_t d0, int64_t d1, const Visible& vis_w, float* attn) const {
    const int64_t stride = hd_ + 2;
    const std::vector<int64_t>& first_task = vis_w.first_task;
    for (int64_t d = d0; d < d1; ++d) {
      const int64_t chunks = first_task[d + 1] - first_task[d];
      for (int64_t h = 0; h < H_; ++h) {
        float* o = attn + d * H_ * hd_ + h * hd_;
        if (chunks == 0) {  // nothing visible (never for a real decode, which sees its own token): zeros
          std::fill(o, o + hd_, 0.f);
          continue;
        }
        auto part = [&](int64_t c) { return partial_.data() + ((first_task[d] + c) * H_ + h) * stride; };
        if (chunks == 1) {
          const float* p = part(0);
          const float inv = 1.f / p[hd_ + 1];
#pragma omp simd
          for (int64_t i = 0; i < hd_; ++i) o[i] = p[i] * inv;
          continue;
        }
        float mx = part(0)[hd_];
        for (int64_t c = 1; c < chunks; ++c) mx = std::max(mx, part(c)[hd_]);
        std::fill(o, o + hd_, 0.f);
        float sum = 0.f;
        for (int64_t c = 0; c < chunks; ++c) {
          const float* p = part(c);
          const float w = std::exp(p[hd_] - mx);
          sum += w * p[hd_ + 1];
#pragma omp simd
          for (int64_t i = 0; i < hd_; ++i) o[i] += w * p[i];
        }
        const float inv = 1.f / sum;
#pragma omp simd
        for (int64_t i = 0; i < hd_; ++i) o[i] *= inv;
      }
    }
  }

  float eps_;
  int64_t H_, KVH_, hd_, I_;
  float scale_, softcap_;  // softcap 0: none
  Act act_ = Act::Silu;
  int64_t hidden_ = 0, qkvN_ = 0, capacity_ = 0;
  int64_t num_rotations_ = 0, num_windows_ = 1;  // how many rotation tables / windows the layers index
  std::vector<Layer> layers_;
  std::vector<float> h_, qkv_, attn_, proj_, gu_;
  std::vector<Visible> vis_;    // per window, rebuilt every step
  std::vector<float> partial_;  // per task and q head of its group: acc[hd], max, sum
  std::mutex mutex_;
};

}  // namespace

void register_fused_decode(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<FusedDecoder>(m, "FusedDecoder")
      .def(py::init<std::vector<at::Tensor>, std::vector<QWeight>, std::vector<QWeight>, std::vector<at::Tensor>,
                    std::vector<QWeight>, std::vector<QWeight>, double, int64_t, int64_t, int64_t, int64_t, double,
                    std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                    std::vector<at::Tensor>, const std::string&, double, std::vector<int64_t>,
                    std::vector<int64_t>>(),
           py::arg("input_norms"), py::arg("qkv"), py::arg("o"), py::arg("mlp_norms"), py::arg("gate_up"),
           py::arg("down"), py::arg("eps"), py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"),
           py::arg("intermediate_size"), py::arg("scale"), py::arg("attn_out_norms") = std::vector<at::Tensor>(),
           py::arg("mlp_out_norms") = std::vector<at::Tensor>(), py::arg("q_norms") = std::vector<at::Tensor>(),
           py::arg("k_norms") = std::vector<at::Tensor>(), py::arg("activation") = "silu",
           py::arg("attn_softcap") = 0.0, py::arg("layer_rotation") = std::vector<int64_t>(),
           py::arg("layer_window") = std::vector<int64_t>(),
           "Optional lists are empty (none) or one entry per layer: sandwich norms after attention and after the "
           "MLP, per-head q and k norms ([head_dim]); layer_rotation indexes forward's rotations (-1: no RoPE), "
           "layer_window its (decode_gather, decode_mask) pairs (default: 0 for every layer).")
      .def("forward", &FusedDecoder::forward, py::arg("x"), py::arg("rotations"), py::arg("decode_gathers"),
           py::arg("decode_masks"), py::arg("slot_mapping"), py::arg("k_caches"), py::arg("v_caches"),
           py::arg("final_norm") = py::none(), py::arg("final_eps") = 0.0, py::call_guard<py::gil_scoped_release>(),
           "Every decoder layer for one decode step; returns the residual stream [D, hidden], after the model's "
           "final RMS norm when its weight is given. Writes each layer's new K/V into its caches at slot_mapping.")
      .def_property_readonly("num_layers", &FusedDecoder::num_layers);
}
