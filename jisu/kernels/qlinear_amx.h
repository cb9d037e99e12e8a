// int4 x int16-activation products on AMX, Intel's tile matrix unit (Sapphire Rapids and later), for prompts:
// the same numbers as the vector kernels, bit for bit (qlinear_amx.cpp says why), several times the arithmetic.
#pragma once
#include <cstdint>

#include "qlinear.h"

// Rows of x from which a product takes the AMX kernel: below, the vector kernels win (x tiles go in pairs of 16
// rows, and expanding the weights costs the same for any number of rows). Measured (2 threads, one 1536 x 576
// int4 matrix, AMX vs vector ms): 16 rows 0.31 vs 0.30, 24 0.34 vs 0.45, 32 0.36 vs 0.58.
constexpr int64_t kAmxMinRows = 24;

// Whether this process can run the AMX kernel: a build with AVX-512, a CPU with AMX-BF16, and the OS's grant of
// the tile state (asked once, at the first call). JISU_AMX=0 turns it off.
bool amx_available();
// Tests and benchmarks: turn the AMX kernel off or back on (it is on wherever it is available).
void amx_set_enabled(bool on);
// Whether the next int4 product of M rows (int16 activations) takes the AMX kernel.
bool amx_takes(const QWeight& w, int64_t M);

// The A operand of M rows of x (K % 32 == 0): amx_x_elems(M, K) bf16 values at xa, made row by row from each row
// rounded to int16 (xq [K]: row m), and the padding rows after the last (once, after or before the rows).
int64_t amx_x_elems(int64_t M, int64_t K);
void amx_prepare_x_row(const int16_t* xq, int64_t m, int64_t K, uint16_t* xa);
void amx_pad_rows(int64_t M, int64_t K, uint16_t* xa);

// Output rows [n0, n1) (n0 a multiple of 4) of the int4 product y = x W^T (+ bias) from in.xa, in.xd and in.xs, on
// the calling thread. Only where amx_takes(w, in.M).
void amx_int4_task(const QWeight& w, const MatvecInput& in, float* y, int64_t n0, int64_t n1);
