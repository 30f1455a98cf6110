// AMX kernel (TDPBF16PS tiles) for bf16 weights and bf16 x (entry points in
// nm_amx_avx512.cpp). Per block of 16 outputs the thread expands the weight's 16 rows
// (plain packed format or the prepared lanes layout) into a panel of dense bf16 in its own
// cache (16 x K bf16: 352 KiB at 11008 inputs; never a dense copy of the weight); each 16 x 32 slice of
// the panel is one A tile that meets up to four B tiles of x. x is laid out once per call in
// the tiles' pair-interleaved form (B[r][2 * row + j] = x[row][2 r + j]), so the products are
// C[output][row]: 16 x 16 fp32 per accumulator tile, transposed into y when stored.
//
// Tiles: tmm0-3 accumulators (up to 64 rows of x per pass over the panel), tmm4 the weight
// slice, tmm5-7 x (tmm5 again for the fourth). All eight are configured as 16 rows of 64
// bytes; the panel and x are zero-padded to whole tiles, so no tile is ever partial.
//
// NOT RUN ON AMX HARDWARE: the machines this was written on (AMD Zen 4) have no AMX. Built with
// NMSPARSE_AMX_EMULATE, the six tile operations below are C++ that follows Intel's pseudo-code
// for LDTILECFG, TILELOADD, TILESTORED, TILEZERO and TDPBF16PS (TILERELEASE does nothing there),
// and the tests check that build against F.linear on every CPU with AVX512_BF16; the real build
// differs only in those six operations. Before the dispatcher uses the real one, a separate
// process runs nmsparse_amx_selftest (nmsparse/kernels/cpu/__init__.py: amx_reason), so that a
// fault or a wrong result on a real AMX CPU disables it with a warning instead of crashing the
// caller.
#pragma once

#ifdef __linux__
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "nm_prepacked_avx512.h"

namespace {

// The AMX target and intrinsics need GCC >= 11 or Clang >= 12; with an older compiler the
// library still builds (every other kernel in it runs) and the AMX entry points say so.
#if defined(NMSPARSE_AMX_EMULATE)
#define NMSPARSE_AMX_BUILD 1
#elif (defined(__clang__) && __clang_major__ >= 12) || \
    (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)
#define NMSPARSE_AMX_BUILD 0
#else
#define NMSPARSE_AMX_BUILD -1
#endif

#if NMSPARSE_AMX_BUILD == 0
#define AMX_TARGET __attribute__((target("avx512bf16,avx512vbmi2,avx512vbmi,amx-tile,amx-bf16")))
#else
#define AMX_TARGET BF16_TARGET
#endif

// LDTILECFG's 64-byte operand (palette 1).
struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

constexpr int64_t AMX_TILE_K = 32;              // bf16 inputs per tile row (64 bytes)
constexpr int64_t AMX_TILE_ELEMS = 16 * 32;     // bf16 per 1 KiB tile
constexpr int AMX_GROUP = 4;                    // x tiles (16 rows each) per pass: tmm0-3

#if NMSPARSE_AMX_BUILD != 0
// Emulated (NMSPARSE_AMX_EMULATE), or not built (an old compiler: never called, since
// nmsparse_amx_emulated() returns -1 and amx_request() refuses).
struct EmulatedTiles {
  TileConfig config;
  uint8_t data[8][16][64];
};
inline EmulatedTiles& emulated_tiles() {
  static thread_local EmulatedTiles tiles;
  return tiles;
}
inline void amx_config(const TileConfig* config) {
  EmulatedTiles& t = emulated_tiles();
  t.config = *config;
  memset(t.data, 0, sizeof t.data);
}
// TILELOADD: rows past the configured ones, and bytes past colsb, read as zero.
inline void amx_load(int tile, const void* base, int64_t stride) {
  EmulatedTiles& t = emulated_tiles();
  for (int r = 0; r < 16; ++r) {
    memset(t.data[tile][r], 0, 64);
    if (r < t.config.rows[tile])
      memcpy(t.data[tile][r], static_cast<const char*>(base) + r * stride, t.config.colsb[tile]);
  }
}
inline void amx_store(int tile, void* base, int64_t stride) {
  EmulatedTiles& t = emulated_tiles();
  for (int r = 0; r < t.config.rows[tile]; ++r)
    memcpy(static_cast<char*>(base) + r * stride, t.data[tile][r], t.config.colsb[tile]);
}
inline void amx_zero(int tile) { memset(emulated_tiles().data[tile], 0, 1024); }
// bf16 -> fp32 with denormals read as zero, as TDPBF16PS does.
inline float amx_input(uint16_t v) { return scalar_f32((v & 0x7F80) ? v : (uint16_t)(v & 0x8000)); }
// TDPBF16PS: c[m][n] += a[m][2k] b[k][2n] + a[m][2k + 1] b[k][2n + 1] over k, fp32, denormal
// results flushed to zero.
inline void amx_dot(int c, int a, int b) {
  EmulatedTiles& t = emulated_tiles();
  const TileConfig& cfg = t.config;
  for (int m = 0; m < cfg.rows[c]; ++m)
    for (int n = 0; n < cfg.colsb[c] / 4; ++n) {
      float acc;
      memcpy(&acc, &t.data[c][m][4 * n], 4);
      for (int k = 0; k < cfg.colsb[a] / 4; ++k) {
        uint16_t a0, a1, b0, b1;
        memcpy(&a0, &t.data[a][m][4 * k], 2);
        memcpy(&a1, &t.data[a][m][4 * k + 2], 2);
        memcpy(&b0, &t.data[b][k][4 * n], 2);
        memcpy(&b1, &t.data[b][k][4 * n + 2], 2);
        acc += amx_input(a0) * amx_input(b0);
        acc += amx_input(a1) * amx_input(b1);
        if (acc != 0 && __builtin_fabsf(acc) < 1.17549435e-38f) acc = acc < 0 ? -0.0f : 0.0f;
      }
      memcpy(&t.data[c][m][4 * n], &acc, 4);
    }
}
inline void amx_release() {}
#define AMX_LOAD(T, base, stride) amx_load(T, base, stride)
#define AMX_STORE(T, base, stride) amx_store(T, base, stride)
#define AMX_ZERO(T) amx_zero(T)
#define AMX_DOT(C, A, B) amx_dot(C, A, B)
#else
// The compiler barriers make every store to the panel, x or the config happen before the
// tile instruction that reads it: GCC's tileloadd and ldtilecfg asm do not declare that they
// read memory (ldtilecfg names only the first 8 bytes of its operand).
AMX_TARGET inline void amx_config(const TileConfig* config) {
  __asm__ volatile("" ::: "memory");
  _tile_loadconfig(config);
}
AMX_TARGET inline void amx_release() { _tile_release(); }
#define AMX_LOAD(T, base, stride)        \
  do {                                   \
    __asm__ volatile("" ::: "memory");   \
    _tile_loadd(T, base, stride);        \
  } while (0)
#define AMX_STORE(T, base, stride) _tile_stored(T, base, stride)
#define AMX_ZERO(T) _tile_zero(T)
#define AMX_DOT(C, A, B) _tile_dpbf16ps(C, A, B)
#endif

// x (batch x in, bf16) as B tiles: tile (mb, kc) at xv + (mb * chunks + kc) * AMX_TILE_ELEMS,
// row r holding (x[16 mb + q][32 kc + 2 r], x[..][32 kc + 2 r + 1]) for q = 0..15; zeros past
// the rows and the inputs. This thread's share of the tiles (called by every thread).
inline void amx_layout_x(const bf16_t* x, int64_t batch, int64_t in, int64_t chunks,
                         int64_t row_tiles, bf16_t* xv) {
  const int64_t threads = omp_get_num_threads(), me = omp_get_thread_num();
  const int64_t tiles = row_tiles * chunks;
  for (int64_t t = tiles * me / threads; t < tiles * (me + 1) / threads; ++t) {
    const int64_t mb = t / chunks, kc = t % chunks;
    uint32_t* tile = reinterpret_cast<uint32_t*>(xv + t * AMX_TILE_ELEMS);
    const int64_t k0 = kc * AMX_TILE_K;
    const int64_t pairs = in - k0 >= AMX_TILE_K ? 16 : (in - k0 + 1) / 2;
    for (int q = 0; q < 16; ++q) {
      const int64_t row = mb * 16 + q;
      if (row >= batch) {
        for (int r = 0; r < 16; ++r) tile[r * 16 + q] = 0;
        continue;
      }
      const bf16_t* src = x + row * in + k0;
      int r = 0;
      for (; r < pairs; ++r) {
        const uint32_t low = src[2 * r];
        const uint32_t high = k0 + 2 * r + 1 < in ? src[2 * r + 1] : 0;
        tile[r * 16 + q] = low | high << 16;
      }
      for (; r < 16; ++r) tile[r * 16 + q] = 0;
    }
  }
}

// G (1-4) accumulators over the whole panel: rows [16 first, 16 (first + G)) of x against the
// panel's 16 outputs; the results, transposed, into y[row][o + n] (+ bias) for the rows below
// batch and the outputs below `outputs`.
template <int G>
AMX_TARGET void amx_pass(const bf16_t* panel, int64_t ld, const bf16_t* xv, int64_t chunks,
                         int64_t first, int64_t batch, int64_t o, int64_t outputs,
                         const float* bias, float* y, int64_t ldy, float* c) {
  AMX_ZERO(0);
  if constexpr (G > 1) AMX_ZERO(1);
  if constexpr (G > 2) AMX_ZERO(2);
  if constexpr (G > 3) AMX_ZERO(3);
  const int64_t next = chunks * AMX_TILE_ELEMS;  // from one row tile of x to the next
  for (int64_t kc = 0; kc < chunks; ++kc) {
    const bf16_t* b = xv + (first * chunks + kc) * AMX_TILE_ELEMS;
    AMX_LOAD(4, panel + kc * AMX_TILE_K, ld * 2);
    AMX_LOAD(5, b, 64);
    AMX_DOT(0, 4, 5);
    if constexpr (G > 1) {
      AMX_LOAD(6, b + next, 64);
      AMX_DOT(1, 4, 6);
    }
    if constexpr (G > 2) {
      AMX_LOAD(7, b + 2 * next, 64);
      AMX_DOT(2, 4, 7);
    }
    if constexpr (G > 3) {
      AMX_LOAD(5, b + 3 * next, 64);
      AMX_DOT(3, 4, 5);
    }
  }
  AMX_STORE(0, c, 64);
  if constexpr (G > 1) AMX_STORE(1, c + 256, 64);
  if constexpr (G > 2) AMX_STORE(2, c + 512, 64);
  if constexpr (G > 3) AMX_STORE(3, c + 768, 64);
  for (int g = 0; g < G; ++g)
    for (int q = 0; q < 16; ++q) {
      const int64_t row = (first + g) * 16 + q;
      if (row >= batch) break;
      float* out = y + row * ldy + o;
      for (int64_t n = 0; n < outputs; ++n)
        out[n] = c[g * 256 + n * 16 + q] + (bias ? bias[o + n] : 0.0f);
    }
}

// The kernel: `expand(o, outputs, panel, ld, scratch)` writes the dense rows [o, o + outputs)
// of the weight into the panel's first rows (inputs [0, in) of each); the rest of the panel
// stays zero. Returns 0, or 2 when out of memory.
template <typename Expand>
AMX_TARGET int amx_run(const bf16_t* x, int64_t batch, int64_t in, int64_t out, const float* bias,
                       float* y, int threads, const Expand& expand, int64_t scratch_bytes) {
  const int64_t chunks = (in + AMX_TILE_K - 1) / AMX_TILE_K;
  // a row stride of a multiple of 1 KiB would put the 16 rows a tile load reads in one L1 set
  const int64_t ld = chunks * AMX_TILE_K + (chunks % 16 == 0 ? AMX_TILE_K : 0);
  const int64_t row_tiles = (batch + 15) / 16;
  bf16_t* xv = reinterpret_cast<bf16_t*>(scratch(1, row_tiles * chunks * AMX_TILE_ELEMS * 2));
  if (!xv) return 2;
  int failed = 0;
#pragma omp parallel num_threads(threads)
  {
    amx_layout_x(x, batch, in, chunks, row_tiles, xv);
    const int64_t panel_bytes = 16 * ld * 2, c_bytes = AMX_GROUP * 256 * 4;
    char* kept = scratch(0, panel_bytes + c_bytes + scratch_bytes);
    if (!kept) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp barrier
    int64_t begin, end;
    share(out, begin, end);
    if (kept && begin < end) {
      bf16_t* panel = reinterpret_cast<bf16_t*>(kept);
      float* c = reinterpret_cast<float*>(kept + panel_bytes);
      uint8_t* rest = reinterpret_cast<uint8_t*>(kept + panel_bytes + c_bytes);
      memset(panel, 0, (size_t)panel_bytes);
      TileConfig config;
      memset(&config, 0, sizeof config);
      config.palette = 1;
      for (int t = 0; t < 8; ++t) {
        config.rows[t] = 16;
        config.colsb[t] = 64;
      }
      amx_config(&config);
      for (int64_t o = begin; o < end; o += 16) {
        const int64_t outputs = end - o < 16 ? end - o : 16;
        if (outputs < 16) memset(panel + outputs * ld, 0, (size_t)((16 - outputs) * ld * 2));
        expand(o, outputs, panel, ld, rest);
        int64_t first = 0;
        for (; first + AMX_GROUP <= row_tiles; first += AMX_GROUP)
          amx_pass<4>(panel, ld, xv, chunks, first, batch, o, outputs, bias, y, out, c);
        const int64_t left = row_tiles - first;
        if (left == 3) amx_pass<3>(panel, ld, xv, chunks, first, batch, o, outputs, bias, y, out, c);
        if (left == 2) amx_pass<2>(panel, ld, xv, chunks, first, batch, o, outputs, bias, y, out, c);
        if (left == 1) amx_pass<1>(panel, ld, xv, chunks, first, batch, o, outputs, bias, y, out, c);
      }
      amx_release();
    }
  }
  return failed ? 2 : 0;
}

// Linux gives a process the AMX tile state only after it asks (arch_prctl
// ARCH_REQ_XCOMP_PERM for XTILEDATA); without it the first tile instruction faults. 0 when
// granted (or already), 1 when refused.
inline int amx_request() {
#if NMSPARSE_AMX_BUILD == 1
  return 0;
#elif NMSPARSE_AMX_BUILD == -1 || !defined(__linux__)
  return 1;
#else
  const long get_permission = 0x1022, request_permission = 0x1023, xtiledata = 18;
  if (syscall(SYS_arch_prctl, request_permission, xtiledata)) return 1;
  unsigned long granted = 0;
  if (syscall(SYS_arch_prctl, get_permission, &granted)) return 1;
  return (granted >> xtiledata) & 1 ? 0 : 1;
#endif
}

}  // namespace
