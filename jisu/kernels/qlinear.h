// jisu's CPU weight formats as the C++ kernels see them.
//
// A QWeight is one [N, K] matrix (N output rows, K inputs) in one of three formats:
//   bits 32: data float32 [N, K]                      w[n, k] = data[n, k]
//   bits 8 : data int8    [N, K], scales f16 [N, K/G] w[n, k] = scale[n, k/G] * data[n, k]
//   bits 4 : w[n, k] = scale[n, k/G] * q[n, k] + zero[n, k/G],  q in 0..15. Built from data uint8 [N, K/2] and
//            scales, zeros f16 [N, K/G], with nibbles packed per 32 consecutive inputs as GGUF's Q4_0/Q4_1 blocks
//            are (byte j of a 32-input block holds input j in its low nibble and input j + 16 in its high one),
//            then repacked by the constructor into row quads, the only copy kept: data uint8 [ceil(N/4), R].
//            Quad i holds rows 4i..4i+3 (missing rows of the last quad are zeros) as K/G group records of
//            G/32 * 64 + 16 bytes each: the group's 32-input blocks, 64 bytes each (row r's 16 bytes at 16r), then
//            the 4 rows' scales and then their 4 zeros, f16. So a decode reads each thread's share of W front to
//            back as one stream (the row-major layout read 12: 4 rows' nibbles, scales and zeros; keeping a quad's
//            scales after all of its blocks instead measured 2x slower, qlinear.cpp).
// G (group) divides K; for bits 4 it is a multiple of 32; for bits 8 it is 32 (Q8_0) or K (per output channel).
// bias is float32 [N] or undefined.
// Outlier columns (int8 / int4, optional): a few inputs whose activations run far larger than the rest (the
// "massive activations" of the attention-sink token) keep their weights in float32 beside the blocks:
// outlier_cols int64 [C] (distinct inputs), outlier_weights float16 [N, C]; the blocks hold zeros there, so
// w[n, outlier_cols[j]] = outlier_weights[n, j]. Why: weight rounding error in those columns is multiplied by the
// largest activations, and through attention it reaches every later token (jisu/quant/outliers.py).
#pragma once
#include <torch/extension.h>

struct QWeight {
  int64_t bits = 32;
  int64_t N = 0, K = 0, group = 0;
  // bits 8 / 4 at up to 192 rows: 16 rounds x to int16 per 32-input block for integer dot products (faster;
  // qlinear.cpp bounds the rounding), 32 keeps x in float32, 8 rounds it to int8 (bits 4 only, faster still and
  // coarser: asked for explicitly; bits 8 then keeps int16). Ignored for bits 32 and for K or G not % 32.
  int64_t act_bits = 16;
  at::Tensor data, scales, zeros, bias;  // bits 4: data holds the row quads, scales / zeros are undefined
  at::Tensor outlier_cols, outlier_weights;  // undefined when none; weights held as row octets (qlinear.cpp)

  QWeight(int64_t bits, at::Tensor data, c10::optional<at::Tensor> scales, c10::optional<at::Tensor> zeros,
          int64_t group, c10::optional<at::Tensor> bias, c10::optional<at::Tensor> outlier_cols = c10::nullopt,
          c10::optional<at::Tensor> outlier_weights = c10::nullopt);
  int64_t nbytes() const;
};

// y[M, N] = x[M, K] . W^T (+ bias); x and y are contiguous row-major float32. Made for decode (M up to 128 in a
// fused step), correct and fast for any M up to a few hundred rows. Runs its own at::parallel_for over output
// rows (called inside a parallel region it runs on the calling thread). Each (m, n) is summed in one order that
// depends on neither M nor the thread split, so a sequence gets the same numbers alone or in a batch (the order
// is spelled out in qlinear.cpp). int8 / int4 with act_bits 16 (K and G multiples of 32) round x to int16 per 32 inputs
// first: each input moves by at most 2^-16 of its block's largest magnitude. Outlier columns come last:
// y[m, n] += fma-chain over j in order of outlier_weights[n, j] * x[m, outlier_cols[j]] (float x).
void qweight_matvec(const QWeight& w, const float* x, int64_t M, float* y);

// The same product split in two steps, for a team of threads already inside one parallel region (the fused
// decoder runs a whole decode step in one): one thread prepares x once (int8 / int4: x rounded to int16 per
// 32-input block, group sums for the zero term; held in that thread's scratch until its next prepare), then
// each of `parts` threads computes its share of the output rows (part = its index); the caller puts a barrier
// between the two and after. The numbers are qweight_matvec's, bit for bit, whatever the split.
// The buffers are the preparing thread's scratch: qweight_prepare_rows writes them, the products read them.
struct MatvecInput {
  const float* x = nullptr;
  int64_t M = 0;
  int16_t* xq = nullptr;   // null: float32 (or int8) activations
  float* xd = nullptr;
  float* xs = nullptr;     // int4: per-group sums of x
  int8_t* xq8 = nullptr;   // int4 with act_bits 8: x rounded to int8 per 32-input block (scales in xd)
  uint16_t* xa = nullptr;  // int4 on AMX: x rounded as xq, in the tiles' A layout (qlinear_amx.h; rows padded)
};
MatvecInput qweight_prepare(const QWeight& w, const float* x, int64_t M);
// The same preparation shared by a team (long prompts): one thread sizes the buffers (begin: nothing computed
// yet), then the team fills rows [m0, m1) each (every row once; the thread whose range ends at M also writes the
// padding some kernels need), with a barrier after.
MatvecInput qweight_prepare_begin(const QWeight& w, const float* x, int64_t M);
void qweight_prepare_rows(const QWeight& w, const MatvecInput& in, int64_t m0, int64_t m1);
void qweight_rows(const QWeight& w, const MatvecInput& in, float* y, int64_t part, int64_t parts);

// Any number of rows: up to 128 (float32) / 192 (int8, int4) rows -> qweight_matvec (measured faster there, and
// batch-invariant); more (prefill) -> a float32 GEMM over tiles of W dequantized one at a time (the whole matrix
// is never dequantized at once).
at::Tensor qlinear(const at::Tensor& x, const QWeight& w);

// The float32 [N, K] matrix (tests, and exporting to other formats), or only `rows` of it (embedding lookups).
at::Tensor qweight_dequantize(const QWeight& w, const c10::optional<at::Tensor>& rows = c10::nullopt);

namespace pybind11 { class module_; }
void register_qlinear(pybind11::module_& m);
