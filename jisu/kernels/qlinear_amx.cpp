// int4 x int16-activation products on AMX (qlinear_amx.h): the prompt rows' form of the int4 row-quad kernels
// (qlinear.cpp, "int4 row quads with 16-bit activations"), giving the same bits.
//
// What the vector kernels compute per output (m, n), and so what this must reproduce: per 32-input block b, two
// exact integer sums of nibble x int16 products, C_a over inputs 0-7 and 16-23 and C_b over 8-15 and 24-31; per
// block T_h = fma(float(C_h), scale_n,g * d_m,b, T_h) for both halves h; per group Z = fma(zero_n,g, X_m,g, Z);
// y = ((T_a + T_b) + Z) + bias (+ 0 without one). The float steps are per output, so any layout of outputs over
// vector lanes gives the same bits; only the integers have to come out of the tile unit exactly.
//
// AMX has no int16 products, but AMX-BF16 multiplies bf16 pairs into float32 sums: each int16 input splits exactly
// into x = 256 * xh + xl (xh = x >> 8 in -128..127, xl = x & 255), both exact in bf16 (at most 8 significant
// bits), and each nibble w gives the pair (256 * w, w), exact as well. One bf16 pair product is then
// 256 w xh + w xl = w x, and a tile product sums 16 such inputs (one half of a block) per output: every product
// and partial sum is an integer below 2^23, so float32 holds each exactly whatever order the unit adds in, and the
// tile's float C_h is the vector kernels' integer, converted. One tile product (TDPBF16PS) makes 16 x 16 outputs'
// half-block sums; the A tile is 16 rows of x (their halves as bf16 pairs, prepared once per call), the B tile 16
// weight rows' nibbles as bf16 pairs, expanded once per 16 weight rows for all rows of x.
#include "qlinear_amx.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "int4_quads.h"

#if defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__x86_64__) && defined(__linux__)
#define JISU_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define JISU_AMX 0
#endif

namespace {

std::atomic<bool> g_enabled{true};

#if JISU_AMX
// The AMX code alone is compiled for AMX (and AVX-512 VBMI's byte permutes, which every AMX CPU has): the rest of
// the avx512 set must still run on AVX-512 CPUs without them.
#define JISU_AMX_TARGET __attribute__((target("avx512vbmi,amx-tile,amx-bf16")))

bool probe() {
  const char* env = std::getenv("JISU_AMX");
  if (env && std::strcmp(env, "0") == 0) return false;
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool vbmi = c & (1u << 1), amx_bf16 = d & (1u << 22), amx_tile = d & (1u << 24);
  if (!(vbmi && amx_bf16 && amx_tile)) return false;
  // Linux hands out the 8 KB tile state only on request (once per process, for all its threads).
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
}

constexpr int kTile = 16;                 // rows of x / weight rows per tile, pairs of a tile row
constexpr int64_t kTileElems = 16 * 32;   // bf16 values in a 16 x 64-byte tile
// x tiles go in pairs (int4_task): rows padded with zeros to a multiple of 32.
inline int64_t padded_rows(int64_t M) { return (M + 2 * kTile - 1) / (2 * kTile) * (2 * kTile); }

// Tiles 0-1: A (x) for halves a and b; 2-3: B (weights); 4-7: C for two weight tiles. All 16 rows of 64 bytes.
struct TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

JISU_AMX_TARGET void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = kTile, cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
}

// bf16 of v, for values that float32 and bf16 both hold exactly (at most 8 significant bits): the top half.
inline uint16_t bf16_of(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  return static_cast<uint16_t>(bits >> 16);
}

// The byte-permute indices and the pair table of expand_weights, made once per process.
struct ExpandTables {
  // The 4 quads' block as 16 rows c of 16 bytes (byte 16c + jb) in two 128-byte halves. pick[h][t]'s byte
  // 16u + c selects byte 8h + 4t + u of row c: the same index into either half, rows 0-7 from the first, 8-15
  // from the second.
  alignas(64) uint8_t pick[2][2][64];
  // Tile row j from 4 rows' worth X (byte 16u + c: the nibble of row c for j = base + u): int16 lane 2c takes
  // X + 16 (the table's 256 w), lane 2c + 1 X (w); odd bytes zero.
  alignas(64) uint8_t spread[4][64];
  // Lanes 0-15: bf16(w), 16-31: bf16(256 w), for the nibble values w.
  alignas(64) uint16_t pairs[32];
  ExpandTables() {
    for (int h = 0; h < 2; ++h)
      for (int t = 0; t < 2; ++t)
        for (int u = 0; u < 4; ++u)
          for (int c = 0; c < 16; ++c) pick[h][t][16 * u + c] = static_cast<uint8_t>(16 * (c % 8) + 8 * h + 4 * t + u);
    for (int u = 0; u < 4; ++u)
      for (int c = 0; c < 16; ++c) {
        spread[u][4 * c] = static_cast<uint8_t>(16 * u + c);
        spread[u][4 * c + 1] = 0;
        spread[u][4 * c + 2] = static_cast<uint8_t>(64 + 16 * u + c);
        spread[u][4 * c + 3] = 0;
      }
    for (int w = 0; w < 16; ++w) pairs[w] = bf16_of(static_cast<float>(w)), pairs[16 + w] = bf16_of(256.f * w);
  }
};

// 16 weight rows from row nt (whole quads; quads past the matrix read as zeros) as B tiles: for block b and half h,
// 16 tile rows j of 16 (256 w, w) bf16 pairs, one per weight row c, w = row c's input k_j(h) (the order of
// amx_prepare_x_row: j < 8 input 8h + j, else 16 + 8h + j - 8). bx: nb * 2 tiles. Also the 16 rows' scales and
// zeros per group as floats (sc, zr: ng x 16).
JISU_AMX_TARGET void expand_weights(const Int4Quads& layout, int64_t quads, int64_t nt, int64_t nb, uint16_t* bx,
                                    float* sc, float* zr) {
  static const ExpandTables tables;
  const uint8_t* q[4];
  for (int i = 0; i < 4; ++i) q[i] = nt / 4 + i < quads ? layout.quad(nt + 4 * i) : nullptr;
  const __m512i table = _mm512_load_si512(tables.pairs), lo4 = _mm512_set1_epi8(0x0F), bit4 = _mm512_set1_epi8(0x10);
  constexpr __mmask64 kRows8to15 = 0xFF00FF00FF00FF00ull, kEvenBytes = 0x5555555555555555ull;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t g = b / layout.nbg, i = b % layout.nbg;
    __m512i qv[4];
    for (int k = 0; k < 4; ++k)
      qv[k] = q[k] ? _mm512_loadu_si512(q[k] + layout.block_at(g, i, 0)) : _mm512_setzero_si512();
    for (int h = 0; h < 2; ++h) {
      uint16_t* tile = bx + (2 * b + h) * kTileElems;
      for (int t = 0; t < 2; ++t) {
        const __m512i idx = _mm512_load_si512(tables.pick[h][t]);
        const __m512i p = _mm512_mask_blend_epi8(kRows8to15, _mm512_permutex2var_epi8(qv[0], idx, qv[1]),
                                                 _mm512_permutex2var_epi8(qv[2], idx, qv[3]));
        const __m512i lo = _mm512_and_si512(p, lo4), hi = _mm512_and_si512(_mm512_srli_epi16(p, 4), lo4);
        const __m512i halves[2] = {lo, hi};  // rows j = 4t + u, then 8 + 4t + u
        for (int s = 0; s < 2; ++s) {
          const __m512i x16 = _mm512_or_si512(halves[s], bit4);
          for (int u = 0; u < 4; ++u) {
            const __m512i ix = _mm512_maskz_permutex2var_epi8(kEvenBytes, x16, _mm512_load_si512(tables.spread[u]), halves[s]);
            _mm512_store_si512(tile + (8 * s + 4 * t + u) * 32, _mm512_permutexvar_epi16(ix, table));
          }
        }
      }
    }
  }
  for (int64_t g = 0; g < layout.ng; ++g)
    for (int c = 0; c < 16; ++c) {
      const uint8_t* quad = q[c / 4];
      const at::Half* hv = quad ? reinterpret_cast<const at::Half*>(quad + layout.halves_at(g)) : nullptr;
      sc[g * 16 + c] = hv ? static_cast<float>(hv[c % 4]) : 0.f;
      zr[g * 16 + c] = hv ? static_cast<float>(hv[4 + c % 4]) : 0.f;
    }
}

struct AmxScratch {
  std::vector<uint16_t> bx;
  std::vector<float> sc, zr;
};
AmxScratch& amx_scratch() {
  thread_local AmxScratch s;
  return s;
}

// The tile products go 2 x 2: two x tiles (32 rows) against two weight tiles, 4 products per 4 tile loads, the C
// tiles in 4-7 (tiles 0-1 hold A, 2-3 B). Weight tiles are expanded kWeightTiles at a time (their B stays in L2)
// and every x tile pair passes them; its A, loaded from memory at the first weight pair, then comes from L2 too.
// Measured (one thread, a tile load from L1 / L2 / beyond: 8.5 / 20 / 100-140 TSC cycles; a product ~14).
constexpr int kWeightTiles = 8;
// Blocks whose C tiles are stored before their float steps: each row's T_a, T_b stay in registers over the chunk
// instead of going through memory once a block.
constexpr int kChunkBlocks = 2;

// The float steps of a chunk of nbk blocks for one x tile and one weight tile: for each row m of x and block j in
// order, T_h[m] = fma(C_h, scale * d_m,b, T_h[m]) (the scales of block j's group at sc[j]).
inline void add_chunk(const float (*c)[2][16][16], const float* const* sc, const float* xd, int64_t nb, int64_t b0,
                      int nbk, int64_t mr, float (*t)[16][16]) {
  for (int64_t m = 0; m < mr; ++m) {
    __m512 ta = _mm512_load_ps(t[0][m]), tb = _mm512_load_ps(t[1][m]);
    for (int j = 0; j < nbk; ++j) {
      const __m512 sd = _mm512_mul_ps(_mm512_loadu_ps(sc[j]), _mm512_set1_ps(xd[m * nb + b0 + j]));
      ta = _mm512_fmadd_ps(_mm512_load_ps(c[j][0][m]), sd, ta);
      tb = _mm512_fmadd_ps(_mm512_load_ps(c[j][1][m]), sd, tb);
    }
    _mm512_store_ps(t[0][m], ta);
    _mm512_store_ps(t[1][m], tb);
  }
}

JISU_AMX_TARGET void int4_task(const QWeight& w, const MatvecInput& in, float* y, int64_t n0, int64_t n1) {
  const Int4Quads layout(w);
  const int64_t N = w.N, K = w.K, M = in.M, ng = layout.ng, nbg = layout.nbg, nb = K / 32;
  const int64_t quads = (N + 3) / 4, bx_tile = nb * 2 * kTileElems;  // bf16 values of one weight tile's B
  const int64_t x_tile = nb * 2 * kTileElems;                         // and of one x tile's A
  const float* bp = w.bias.defined() ? w.bias.data_ptr<float>() : nullptr;
  AmxScratch& s = amx_scratch();
  // +32: the tiles must start on 64-byte lines for the aligned stores in expand_weights.
  if (static_cast<int64_t>(s.bx.size()) < kWeightTiles * bx_tile + 32) s.bx.resize(kWeightTiles * bx_tile + 32);
  uint16_t* bx = reinterpret_cast<uint16_t*>((reinterpret_cast<uintptr_t>(s.bx.data()) + 63) & ~uintptr_t(63));
  if (static_cast<int64_t>(s.sc.size()) < kWeightTiles * ng * 16)
    s.sc.resize(kWeightTiles * ng * 16), s.zr.resize(kWeightTiles * ng * 16);
  float* const sc = s.sc.data();  // (s is thread_local: every use would look it up again)
  float* const zr = s.zr.data();
  alignas(64) float c[2][2][kChunkBlocks][2][16][16];  // a chunk's half sums per (x tile, weight tile): [m][col]
  alignas(64) float t[2][2][2][16][16];                // T_a, T_b per (x tile, weight tile)
  configure_tiles();
  for (int64_t nw0 = n0; nw0 < n1; nw0 += 16 * kWeightTiles) {
    const int tiles = static_cast<int>(std::min<int64_t>(kWeightTiles, (n1 - nw0 + 15) / 16));
    for (int k = 0; k < tiles; ++k)
      expand_weights(layout, quads, nw0 + 16 * k, nb, bx + k * bx_tile, sc + k * ng * 16, zr + k * ng * 16);
    for (int64_t m0 = 0; m0 < M; m0 += 2 * kTile) {
      const uint16_t* xa = in.xa + (m0 / kTile) * x_tile;  // x tiles m0 and m0 + 16 (padded rows are zeros)
      for (int k0 = 0; k0 < tiles; k0 += 2) {
        const uint16_t* b0p = bx + k0 * bx_tile;
        const uint16_t* b1p = bx + (k0 + 1 < tiles ? k0 + 1 : k0) * bx_tile;  // an odd last tile: computed twice
        std::memset(t, 0, sizeof t);
        for (int64_t b0 = 0; b0 < nb; b0 += kChunkBlocks) {
          const int nbk = static_cast<int>(std::min<int64_t>(kChunkBlocks, nb - b0));
          for (int j = 0; j < nbk; ++j)
            for (int h = 0; h < 2; ++h) {
              const int64_t e = (2 * (b0 + j) + h) * kTileElems;
              _tile_loadd(0, xa + e, 64);
              _tile_loadd(1, xa + x_tile + e, 64);
              _tile_loadd(2, b0p + e, 64);
              _tile_loadd(3, b1p + e, 64);
              _tile_zero(4);
              _tile_zero(5);
              _tile_zero(6);
              _tile_zero(7);
              _tile_dpbf16ps(4, 0, 2);
              _tile_dpbf16ps(5, 0, 3);
              _tile_dpbf16ps(6, 1, 2);
              _tile_dpbf16ps(7, 1, 3);
              _tile_stored(4, c[0][0][j][h], 64);
              _tile_stored(5, c[0][1][j][h], 64);
              _tile_stored(6, c[1][0][j][h], 64);
              _tile_stored(7, c[1][1][j][h], 64);
            }
          for (int xt = 0; xt < 2; ++xt) {
            const int64_t mr = std::min<int64_t>(kTile, M - (m0 + 16 * xt));
            for (int kk = 0; kk < 2 && k0 + kk < tiles; ++kk) {
              const float* scj[kChunkBlocks];
              for (int j = 0; j < nbk; ++j) scj[j] = sc + ((k0 + kk) * ng + (b0 + j) / nbg) * 16;
              add_chunk(c[xt][kk], scj, in.xd + (m0 + 16 * xt) * nb, nb, b0, nbk, mr, t[xt][kk]);
            }
          }
        }
        for (int xt = 0; xt < 2; ++xt)
          for (int kk = 0; kk < 2 && k0 + kk < tiles; ++kk) {
            const int64_t mx = m0 + 16 * xt, mr = std::min<int64_t>(kTile, M - mx);
            const int64_t nt = nw0 + 16 * (k0 + kk), cols = std::min<int64_t>(16, n1 - nt);
            if (mr <= 0) continue;
            // The zero terms of the tile's 16 rows side by side: 16 independent FMA chains over the groups (one
            // row's chain alone waits ~4 cycles a group).
            __m512 z[kTile];
            for (int r = 0; r < kTile; ++r) z[r] = _mm512_setzero_ps();
            const float* zk = zr + (k0 + kk) * ng * 16;
            for (int64_t g = 0; g < ng; ++g) {
              const __m512 zg = _mm512_loadu_ps(zk + g * 16);
              for (int r = 0; r < kTile; ++r)
                if (r < mr) z[r] = _mm512_fmadd_ps(zg, _mm512_set1_ps(in.xs[(mx + r) * ng + g]), z[r]);
            }
            // y = ((T_a + T_b) + Z) + bias, or + 0 without one (as the vector kernels add).
            const __mmask16 keep = static_cast<__mmask16>(cols >= 16 ? 0xFFFF : (1u << cols) - 1);
            const __m512 bias = bp ? _mm512_maskz_loadu_ps(keep, bp + nt) : _mm512_setzero_ps();
            for (int r = 0; r < mr; ++r) {
              const __m512 o = _mm512_add_ps(_mm512_add_ps(_mm512_load_ps(t[xt][kk][0][r]),
                                                           _mm512_load_ps(t[xt][kk][1][r])), z[r]);
              _mm512_mask_storeu_ps(y + (mx + r) * N + nt, keep, _mm512_add_ps(o, bias));
            }
          }
      }
    }
  }
  _tile_release();
}
#endif

}  // namespace

bool amx_available() {
#if JISU_AMX
  static const bool ok = probe();
  return ok;
#else
  return false;
#endif
}

void amx_set_enabled(bool on) { g_enabled = on; }

bool amx_takes(const QWeight& w, int64_t M) {
  return M >= kAmxMinRows && w.bits == 4 && w.act_bits == 16 && w.K % 32 == 0 && w.group % 32 == 0 && g_enabled &&
         amx_available();
}

int64_t amx_x_elems(int64_t M, int64_t K) {
#if JISU_AMX
  return padded_rows(M) * K * 2;
#else
  return 0;
#endif
}

// Layout: x tiles of 16 rows one after another, each K * 64 bytes: for block b and half h in order, the tile of
// its 16 rows, row m's 32 bf16 the (xh, xl) of its 16 inputs k_j(h) of block b (j < 8: input 8h + j, else
// 16 + 8h + j - 8). An x tile is then read front to back.
void amx_prepare_x_row(const int16_t* xq, int64_t m, int64_t K, uint16_t* xa) {
#if JISU_AMX
  const int64_t nb = K / 32;
  const __m512i low8 = _mm512_set1_epi32(0xFF), top16 = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  uint16_t* row = xa + (m / kTile) * nb * 2 * kTileElems + (m % kTile) * 32;
  for (int64_t b = 0; b < nb; ++b)
    for (int h = 0; h < 2; ++h) {
      const int16_t* xb = xq + 32 * b + 8 * h;
      const __m256i v = _mm256_set_m128i(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xb + 16)),
                                         _mm_loadu_si128(reinterpret_cast<const __m128i*>(xb)));
      const __m512i x = _mm512_cvtepi16_epi32(v);
      const __m512i fh = _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_srai_epi32(x, 8)));
      const __m512i fl = _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_and_si512(x, low8)));
      _mm512_storeu_si512(row + (2 * b + h) * kTileElems,
                          _mm512_or_si512(_mm512_srli_epi32(fh, 16), _mm512_and_si512(fl, top16)));
    }
#else
  (void)xq, (void)m, (void)K, (void)xa;
#endif
}

void amx_pad_rows(int64_t M, int64_t K, uint16_t* xa) {
#if JISU_AMX
  const int64_t nb = K / 32;
  for (int64_t m = M; m < padded_rows(M); ++m) {
    uint16_t* row = xa + (m / kTile) * nb * 2 * kTileElems + (m % kTile) * 32;
    for (int64_t bh = 0; bh < 2 * nb; ++bh) std::memset(row + bh * kTileElems, 0, 64);
  }
#else
  (void)M, (void)K, (void)xa;
#endif
}

void amx_int4_task(const QWeight& w, const MatvecInput& in, float* y, int64_t n0, int64_t n1) {
#if JISU_AMX
  int4_task(w, in, y, n0, n1);
#else
  (void)w, (void)in, (void)y, (void)n0, (void)n1;
  TORCH_CHECK(false, "amx_int4_task: this build has no AMX kernel");
#endif
}
