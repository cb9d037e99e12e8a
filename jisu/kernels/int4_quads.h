// The int4 row-quad layout (qlinear.h) as the kernels address it: shared by the vector kernels (qlinear.cpp) and
// the AMX ones (qlinear_amx.cpp).
#pragma once
#include <cstdint>

#include "qlinear.h"

// Where int4 row quads (qlinear.h) keep each thing: the one place that knows their layout.
struct Int4Quads {
  static constexpr int64_t kRowBytes = 16;                  // one row's 32-input block
  static constexpr int64_t kBlockBytes = 4 * kRowBytes;     // the quad's 4 rows of one block
  static constexpr int64_t kHalvesBytes = 16;               // after a group's blocks: 4 scales, then 4 zeros
  const uint8_t* base;
  int64_t nbg, ng, rec;  // blocks per group, groups, bytes per group record
  Int4Quads(int64_t K, int64_t G, const uint8_t* base_ = nullptr)
      : base(base_), nbg(G / 32), ng(K / G), rec(nbg * kBlockBytes + kHalvesBytes) {}
  explicit Int4Quads(const QWeight& w) : Int4Quads(w.K, w.group, w.data.data_ptr<uint8_t>()) {}
  int64_t quad_bytes() const { return ng * rec; }
  // Offsets inside a quad: row r's i-th block of group g; group g's halves.
  int64_t block_at(int64_t g, int64_t i, int64_t r) const { return g * rec + i * kBlockBytes + r * kRowBytes; }
  int64_t halves_at(int64_t g) const { return g * rec + nbg * kBlockBytes; }
  const uint8_t* quad(int64_t n) const { return base + (n / 4) * quad_bytes(); }  // the quad holding row n
  const uint8_t* block(int64_t n, int64_t b) const { return quad(n) + block_at(b / nbg, b % nbg, n % 4); }
  const at::Half* halves(int64_t n, int64_t g) const {
    return reinterpret_cast<const at::Half*>(quad(n) + halves_at(g));
  }
  void row_scales(int64_t n, float* sc, float* zc) const {
    for (int64_t g = 0; g < ng; ++g) {
      const at::Half* h = halves(n, g);
      sc[g] = static_cast<float>(h[n % 4]);
      zc[g] = static_cast<float>(h[4 + n % 4]);
    }
  }
};
