// N:M sparse Linear on the CPU with AVX-512 (F/BW/VL/DQ; bf16 kernels also AVX512_BF16 and
// AVX512_VBMI2, enabled per function by a target attribute and run only where the CPU has
// them): y = x @ W.T + bias with W packed in the nmsparse.packing format. Only the packed
// bytes are read; nothing is expanded into memory.
//
// This header holds what the library's translation units share (the packed format's masks,
// the dot, table and pair kernels); the entry points live in nm_linear_avx512.cpp (packed
// fp32 values, unpack), nm_linear_bf16_avx512.cpp (packed bf16 values),
// nm_prepacked_avx512.cpp (the prepared layout) and nm_amx_avx512.cpp (AMX), which
// _build.py compiles in parallel and links into one library. Everything here sits in an
// anonymous namespace, so each unit keeps its own copy of what it uses; the only state they
// share is the per-thread scratch (nmsparse_kept_scratch). Called through ctypes by
// nmsparse/kernels/cpu/__init__.py, which checks every argument first.
//
// Two kernels, both accumulating in fp32, both register-blocked and both reading each weight
// once per block of input rows:
// * "dot" (few rows, M a power of two): the positions of 64 consecutive dense inputs are
//   turned into a 64-bit mask (a 256-entry table per index byte), and the packed values are
//   expanded straight from memory into dense registers by that mask (vpexpandw / vexpandps),
//   which then meet up to 8 rows of x: vdpbf16ps (bf16: products exact in fp32) or FMA.
//   P output rows x R input rows accumulators; the x registers are shared by the P rows.
// * "table" (many rows, any M): the rows go into the vector lanes. Per block of KB inputs
//   the thread transposes x into xt[k][lane] (16 to 64 lanes, in L2), and each kept value is
//   broadcast and FMA'd with the row of xt at its position: only the kept products are
//   computed, N/M of the dense work. Partial sums over K blocks live in a per-thread
//   transposed buffer (one vector load/add/store per output row and block).
// Threads take contiguous, static shares of the output rows and never wait for each other
// (no barrier inside the region: on a machine shared with other jobs a barrier waits for the
#pragma once

#include <immintrin.h>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "nm_common.h"

// Defined once, in nm_linear_avx512.cpp: every unit's kernels share the calling thread's kept
// buffers (the scratch below).
__attribute__((visibility("hidden"))) char* nmsparse_kept_scratch(int slot, int64_t bytes);

namespace {


struct Shape {
  int64_t batch, in, out, slots, index_bytes;
  int n, m, w;
};

// Bits per stored position for group size m (as nmsparse.packing.index_width, m <= 256).
inline int index_width(int m) { return m <= 2 ? 1 : m <= 4 ? 2 : m <= 16 ? 4 : 8; }
// The largest M the packed format holds (8-bit positions).
constexpr int MAX_M = 256;

// The dense mask of one output row (bit k set when input k has a kept weight), built from
// its index bytes once per row and read 64 bits at a time by the dot kernels. Index byte i
// holds the positions of values i * per_byte .. + per_byte - 1 (per_byte = 8 / w); its bits
// start at dense bit (i * per_byte / n) * m, the start of its first value's group. Which of
// its values start a new group depends on the byte's phase, (i * per_byte) % n: lut[phase][b]
// holds the dense bits of byte b in that phase, bit ((phase + k) / n) * m + position_k for
// each value k. Where n divides 8 every byte has the same phase, so one table (phase 0)
// serves; N = 3, 5, 6, 7, ... need up to n tables (built only for the phases that occur).
//
// Whole periods go faster: a period is lcm(per_byte, n) values, `period` index bytes, which
// end on a group boundary and give `period_bits` mask bits (8, 16 or 32 wherever M is a
// power of two up to 32, so each period's bits start on a byte; M = 64 keeps the byte loop).
// contrib[j][b] is what byte b adds as byte j of a period (lut[phase_j][b] moved to its
// group's place), so a period is the OR of `period` independent lookups, with no phase or
// group to carry from byte to byte. For 3:4 on 11008x4096 bf16 the dot kernel at one row
// took 10.1 ms cold with the byte loop and 4.3 ms with this one; 16-lane gathers of the same
// tables took 6.7 ms warm on Zen 4, where this loop takes 4.3.
struct Masks {
  static constexpr int MAX_PHASES = 16;
  static constexpr int MAX_PERIOD = 16;
  uint64_t lut[MAX_PHASES][256];
  uint32_t contrib[MAX_PERIOD][256];
  int n, m, per_byte, bits_per_byte;  // bits_per_byte: 0 unless every byte gives the same bits
  int period = 0, period_bits = 0;   // period 0: no vector path
  bool one_phase;

  Masks(int n_, int m_, int w) : n(n_), m(m_), per_byte(8 / w) {
    one_phase = per_byte % n == 0 || n % per_byte == 0;
    // the phases that occur: the multiples of gcd(per_byte, n)
    for (int phase = 0; phase < (one_phase ? 1 : n); phase += std::gcd(per_byte, n)) {
      for (int b = 0; b < 256; ++b) {
        uint64_t bits = 0;
        for (int k = 0; k < per_byte; ++k) {
          // & (m - 1): a corrupt field (>= m) must not add a bit, or more values would be read
          const int position = (b >> (k * w)) & ((1 << w) - 1) & (m - 1);
          const int group = one_phase ? (per_byte >= n ? k / n : 0) : (phase + k) / n;
          bits |= 1ull << ((group * m + position) & 63);
        }
        lut[phase][b] = bits;
      }
    }
    bits_per_byte = per_byte % n == 0 ? per_byte / n * m : 0;
    const int values = std::lcm(per_byte, n);
    const int bits = values / n * m;
    if (values / per_byte <= MAX_PERIOD && (bits == 8 || bits == 16 || bits == 32)) {
      period = values / per_byte;
      period_bits = bits;
      for (int j = 0; j < period; ++j) {
        const int first = j * per_byte;  // the byte's first value: its group and phase
        for (int b = 0; b < 256; ++b)
          contrib[j][b] = (uint32_t)(lut[one_phase ? 0 : first % n][b] << (first / n * m));
      }
    }
  }

  // out: (in + 7) / 8 bytes of mask, then 8 bytes of zeros (the dot kernels read 8 at a time).
  // Bits arrive in order (a byte's bits start where the previous byte's did or after), so
  // they are gathered in a register and written 32 at a time.
  void row(const uint8_t* bits, int64_t index_bytes, int64_t in, uint8_t* out) const {
    row_from(bits, whole_periods(bits, index_bytes, in, out) * period, index_bytes, in, out);
  }
  // Writes the mask bits of the row's first whole periods and returns how many.
  int64_t whole_periods(const uint8_t* bits, int64_t index_bytes, int64_t in,
                        uint8_t* out) const {
    if (!period) return 0;
    int64_t periods = in / period_bits;  // periods whose bits all lie inside the row
    if (periods * period > index_bytes) periods = index_bytes / period;
    switch (period_bits) {
      case 8: return periods_of<1>(bits, periods, out);
      case 16: return periods_of<2>(bits, periods, out);
      default: return periods_of<4>(bits, periods, out);
    }
  }
  template <int BYTES>
  int64_t periods_of(const uint8_t* bits, int64_t periods, uint8_t* out) const {
    switch (period) {  // a constant length, inlined, unrolls the loop over a period's bytes
      case 1: return periods_loop<BYTES>(bits, periods, out, 1);
      case 2: return periods_loop<BYTES>(bits, periods, out, 2);
      case 3: return periods_loop<BYTES>(bits, periods, out, 3);
      case 5: return periods_loop<BYTES>(bits, periods, out, 5);
      case 7: return periods_loop<BYTES>(bits, periods, out, 7);
    }
    return periods_loop<BYTES>(bits, periods, out, period);
  }
  template <int BYTES>
  __attribute__((always_inline)) inline int64_t periods_loop(const uint8_t* bits, int64_t periods,
                                                             uint8_t* out, int length) const {
    for (int64_t p = 0; p < periods; ++p) {
      uint32_t word = 0;
      for (int j = 0; j < length; ++j) word |= contrib[j][bits[p * length + j]];
      memcpy(out + p * BYTES, &word, BYTES);
    }
    return periods;
  }
  // From byte `first`, whose first dense bit must be a multiple of 8 (FastMasks' rest).
  void row_from(const uint8_t* bits, int64_t first, int64_t index_bytes, int64_t in,
                uint8_t* out) const {
    const int64_t bytes = (in + 7) / 8;
    int64_t base = first * per_byte / n * m;  // dense bit of word's bit 0
    memset(out + base / 8, 0, bytes + 8 - base / 8);
    uint64_t word = 0;
    // the byte's first value is in group `group`, `phase` values into it (no division per byte)
    int64_t group = first * per_byte / n;
    int phase = (int)(first * per_byte % n);
    for (int64_t i = first; i < index_bytes; ++i) {
      const int64_t at = group * m;
      while (at - base >= 32) {
        const uint32_t low = (uint32_t)word;
        memcpy(out + base / 8, &low, 4);
        word >>= 32;
        base += 32;
      }
      // at most 32 + 31 bits: a byte's values span at most two groups of up to 16 inputs
      // (M = 32, 64: one value per byte, and its group starts at `base`)
      word |= lut[one_phase ? 0 : phase][bits[i]] << (at - base);
      for (phase += per_byte; phase >= n; phase -= n) ++group;
    }
    memcpy(out + base / 8, &word, 8);  // the 8 zero bytes after the mask leave room
  }
};

#define VBMI_TARGET __attribute__((target("avx512vbmi")))

// The same with a 256-entry byte table (vpermi2b) where one index byte gives exactly 8 mask
// bits (2:4, 2:8, 4:16), 16 (1:4, 1:8, 1:2, 2:16), or two bytes give 8 (4:8); else scalar.
//
// Patterns with whole periods (Masks::period; 4:16, 1:16 and every N not dividing 8 with M a
// power of two up to 32: 3:4, 3:8, 5:8, 6:8, ...) look up each byte j of a period in its own
// table, one per byte of the period's bits (contrib[j] split into bytes: period_tables), K
// periods per step: byte j of every period is picked out of the 64 loaded index bytes with
// vpermb, and the bytes of the K results are interleaved back into order. The scalar loop
// took 190-440 ns per 4096-input row (6:8 on 11008x4096: 4.8 ms a call on one thread, about
// 40 % of the dot kernel's time at one row).
struct FastMasks {
  const Masks& slow;
  __m512i table[2][4];  // [output byte 0 / 1][entries 0-63, 64-127, 128-191, 192-255]
  // [period byte j][output byte h][entries by 64], and where byte j of each period lies (only
  // periods of 1 or 2 mask bytes: whole_periods)
  __m512i period_tables[Masks::MAX_PERIOD][2][4];
  __m512i pick[Masks::MAX_PERIOD];
  int out_bytes = 0, per_step = 0;  // the period's mask bytes, periods per step

  explicit FastMasks(const Masks& masks) : slow(masks) {
    alignas(64) uint8_t bytes[2][256];
    for (int b = 0; b < 256; ++b) {
      bytes[0][b] = (uint8_t)masks.lut[0][b];
      bytes[1][b] = (uint8_t)(masks.lut[0][b] >> 8);
    }
    for (int h = 0; h < 2; ++h)
      for (int q = 0; q < 4; ++q) table[h][q] = _mm512_load_si512(bytes[h] + 64 * q);
    if (!masks.period || masks.period_bits > 16) return;
    out_bytes = masks.period_bits / 8;
    per_step = 64 / (masks.period > out_bytes ? masks.period : out_bytes);
    alignas(64) uint8_t entries[256], places[64];
    for (int j = 0; j < masks.period; ++j) {
      for (int h = 0; h < out_bytes; ++h) {
        for (int b = 0; b < 256; ++b) entries[b] = (uint8_t)(masks.contrib[j][b] >> (8 * h));
        for (int q = 0; q < 4; ++q) period_tables[j][h][q] = _mm512_load_si512(entries + 64 * q);
      }
      for (int k = 0; k < 64; ++k) places[k] = (uint8_t)(k < per_step ? k * masks.period + j : 0);
      pick[j] = _mm512_load_si512(places);
    }
  }
  // The first 64 lanes up to `count`.
  static inline __mmask64 tail64(int64_t count) {
    return count >= 64 ? ~0ull : (1ull << count) - 1;
  }
  // Mask bytes of the row's whole periods (as Masks::whole_periods), per_step at a time, P
  // and B constants so that the accumulators stay in registers. Only where that beat the
  // scalar loop (masks of 11008 rows of 4096 inputs, one Zen 4 thread): 4:16 (P = 2, B = 2)
  // 2.6x, 6:8 (3, 1) 2.9x, 3:4 and 3:8 (3, 2) 1.6x, 8:16 (4, 2) 1.3x; 5:8 (5, 2) 1.0x, 7:8
  // (7, 2) 0.7-1.2x and every period of 4 bytes (1:16, 3:16, 2:32, 4:32) 0.7-0.8x keep it.
  VBMI_TARGET int64_t whole_periods(const uint8_t* bits, int64_t index_bytes, int64_t in,
                                    uint8_t* out) const {
    int64_t periods = in / slow.period_bits;
    if (periods * slow.period > index_bytes) periods = index_bytes / slow.period;
    switch (slow.period * 8 + out_bytes) {  // measured faster than the scalar loop (below)
      case 2 * 8 + 2: return periods_of<2, 2>(bits, periods, out);
      case 3 * 8 + 1: return periods_of<3, 1>(bits, periods, out);
      case 3 * 8 + 2: return periods_of<3, 2>(bits, periods, out);
      case 4 * 8 + 2: return periods_of<4, 2>(bits, periods, out);
    }
    return slow.whole_periods(bits, index_bytes, in, out);  // the rest the scalar way
  }
  template <int P, int B>
  VBMI_TARGET int64_t periods_of(const uint8_t* bits, int64_t periods, uint8_t* out) const {
    // B = 2: lane t of the interleaved result takes byte t / 2 of source t % 2
    const __m512i pairs = _mm512_set_epi8(
        95, 31, 94, 30, 93, 29, 92, 28, 91, 27, 90, 26, 89, 25, 88, 24,
        87, 23, 86, 22, 85, 21, 84, 20, 83, 19, 82, 18, 81, 17, 80, 16,
        79, 15, 78, 14, 77, 13, 76, 12, 75, 11, 74, 10, 73, 9, 72, 8,
        71, 7, 70, 6, 69, 5, 68, 4, 67, 3, 66, 2, 65, 1, 64, 0);
    constexpr int STEP = 64 / (P > B ? P : B);
    for (int64_t p = 0; p < periods; p += STEP) {
      const int64_t count = periods - p < STEP ? periods - p : STEP;
      const __m512i loaded = _mm512_maskz_loadu_epi8(tail64(count * P), bits + p * P);
      __m512i acc[B];
      for (int h = 0; h < B; ++h) acc[h] = _mm512_setzero_si512();
      for (int j = 0; j < P; ++j) {
        const __m512i index = _mm512_permutexvar_epi8(pick[j], loaded);
        for (int h = 0; h < B; ++h)
          acc[h] = _mm512_or_si512(acc[h], lookup(period_tables[j][h], index));
      }
      __m512i result = acc[0];
      if constexpr (B == 2) result = _mm512_permutex2var_epi8(acc[0], pairs, acc[1]);
      _mm512_mask_storeu_epi8(out + p * B, tail64(count * B), result);
    }
    return periods;
  }
  VBMI_TARGET static inline __m512i lookup(const __m512i* t, __m512i index) {
    const __m512i low = _mm512_permutex2var_epi8(t[0], index, t[1]);
    const __m512i high = _mm512_permutex2var_epi8(t[2], index, t[3]);
    return _mm512_mask_blend_epi8(_mm512_movepi8_mask(index), low, high);
  }
  VBMI_TARGET void row(const uint8_t* bits, int64_t index_bytes, int64_t in, uint8_t* out) const {
    const int64_t bytes = (in + 7) / 8;
    const bool pairs = slow.bits_per_byte == 0 && slow.n == 2 * slow.per_byte && slow.m == 8;
    if (slow.bits_per_byte != 8 && slow.bits_per_byte != 16 && !pairs) {
      if (!slow.period) {
        slow.row(bits, index_bytes, in, out);
        return;
      }
      slow.row_from(bits, whole_periods(bits, index_bytes, in, out) * slow.period, index_bytes,
                    in, out);
      return;
    }
    // Whole vectors, then the last partial one with masked loads and stores (the scalar way
    // took ~100 ns for the last 63 bytes: most of a one-row call on a 256 x 448 layer), then
    // the zeros after the mask (row_from from the end writes only those).
    if (slow.bits_per_byte == 8) {
      for (int64_t i = 0; i < index_bytes; i += 64) {
        const __mmask64 part = tail64(index_bytes - i);
        _mm512_mask_storeu_epi8(out + i, part,
                                lookup(table[0], _mm512_maskz_loadu_epi8(part, bits + i)));
      }
    } else if (slow.bits_per_byte == 16) {
      for (int64_t i = 0; i < index_bytes; i += 32) {
        const int64_t left = index_bytes - i;
        const __m512i index = _mm512_maskz_loadu_epi8(tail64(left < 32 ? left : 32), bits + i);
        const __m512i low = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(lookup(table[0], index)));
        const __m512i high = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(lookup(table[1], index)));
        _mm512_mask_storeu_epi8(out + 2 * i, tail64(2 * left),
                                _mm512_or_si512(low, _mm512_slli_epi16(high, 8)));
      }
    } else {  // two index bytes per mask byte; a row holds whole groups, so an even count
      for (int64_t i = 0; i < index_bytes; i += 64) {
        const int64_t left = index_bytes - i;
        const __m512i both = lookup(table[0], _mm512_maskz_loadu_epi8(tail64(left), bits + i));
        const __m512i merged = _mm512_or_si512(both, _mm512_srli_epi16(both, 8));
        _mm256_mask_storeu_epi8(out + i / 2, (__mmask32)tail64(left / 2),
                                _mm512_cvtepi16_epi8(merged));
      }
    }
    slow.row_from(bits, index_bytes, index_bytes, in, out);
  }

};

// Bytes of one row's mask in a MaskRows buffer: the mask (Masks::row's `out`: (in + 7) / 8
// bytes and the zeros after it), rounded up to whole cache lines.
inline int64_t mask_row_bytes(int64_t in) { return ((in + 7) / 8 + 16 + 63) / 64 * 64; }

// Where the dot kernels find the row masks: P rows of `stride` (mask_row_bytes) bytes.
struct MaskRows {
  const Masks* slow;
  const FastMasks* fast;  // null without AVX512_VBMI
  uint8_t* buffer;
  int64_t stride;

  const uint8_t* build(int p, const uint8_t* bits, const Shape& s) const {
    uint8_t* out = buffer + p * stride;
    if (fast) fast->row(bits, s.index_bytes, s.in, out);
    else slow->row(bits, s.index_bytes, s.in, out);
    return out;
  }
};

inline bool power_of_two(int m) { return (m & (m - 1)) == 0; }

// An N:M pattern's mask tables, filled on its first call and kept for the process (about
// 50 KiB per pattern; a process uses a few). Filling them takes tens of microseconds: on a
// 256 x 256 layer that was most of a one-row call. `fast` is only used on CPUs with VBMI
// (its lookups need it; filling it does not).
struct PatternMasks {
  Masks slow;
  FastMasks fast;
  PatternMasks(int n, int m) : slow(n, m, index_width(m)), fast(slow) {}
};

inline const PatternMasks& pattern_masks(int n, int m) {
  static std::mutex lock;
  // never freed: a thread may still be in a kernel while the process exits
  static auto* built = new std::map<int, std::unique_ptr<PatternMasks>>();
  const std::lock_guard<std::mutex> hold(lock);
  std::unique_ptr<PatternMasks>& entry = (*built)[n * 512 + m];
  if (!entry) entry = std::make_unique<PatternMasks>(n, m);
  return *entry;
}

// ---------------------------------------------------------------- dot kernels (few rows)

// fp32 weights expanded by a 16-bit mask; bf16 weights widened to fp32 first.
inline __m512 expand16(__mmask16 mask, const float* v) {
  const int count = __builtin_popcount(mask);
  return _mm512_maskz_expand_ps(mask, _mm512_maskz_loadu_ps((__mmask16)((1u << count) - 1), v));
}
inline __m512 expand16(__mmask16 mask, const bf16_t* v) {
  const int count = __builtin_popcount(mask);
  const __m256i raw = _mm256_maskz_loadu_epi16((__mmask16)((1u << count) - 1), v);
  const __m512 wide = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  return _mm512_maskz_expand_ps(mask, wide);
}

#define BF16_TARGET __attribute__((target("avx512bf16,avx512vbmi2,avx512vbmi")))

// How the dot kernel meets x. Fp32Step: fp32 x, 16 dense inputs per vector, FMA with the
// weights expanded (bf16 weights widened). Bf16Step: bf16 weights and bf16 x, 32 dense inputs
// per vdpbf16ps (pairs of products summed in fp32). Bf16Step's functions carry the bf16
// target, so they cannot be forced inline into the generic loop (only the bf16 kernel, which
// has the target too, inlines them); Fp32Step's are, as the loop was before it was shared.
#define ALWAYS_INLINE __attribute__((always_inline)) inline
struct Fp32Step {
  typedef float X;
  typedef __m512 XVec;
  typedef __mmask16 Lanes;
  static constexpr int WIDTH = 16;
  static ALWAYS_INLINE XVec load_x(Lanes lanes, const float* x) {
    return _mm512_maskz_loadu_ps(lanes, x);
  }
  template <typename T>
  static ALWAYS_INLINE __m512 expand(Lanes part, const T* v) { return expand16(part, v); }
  static ALWAYS_INLINE __m512 madd(__m512 acc, __m512 w, __m512 x) {
    return _mm512_fmadd_ps(w, x, acc);
  }
};

struct Bf16Step {
  typedef bf16_t X;
  typedef __m512i XVec;
  typedef __mmask32 Lanes;
  static constexpr int WIDTH = 32;
  BF16_TARGET static XVec load_x(Lanes lanes, const bf16_t* x) {
    return _mm512_maskz_loadu_epi16(lanes, x);
  }
  // load + register expand: the memory form of vpexpandw is slow on some CPUs
  BF16_TARGET static __m512i expand(Lanes part, const bf16_t* v) {
    const int count = __builtin_popcount(part);
    return _mm512_maskz_expand_epi16(part, _mm512_maskz_loadu_epi16((Lanes)((1ull << count) - 1), v));
  }
  BF16_TARGET static __m512 madd(__m512 acc, __m512i w, __m512i x) {
    return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)x);
  }
};

// R rows of x (row stride ldx) times P output rows starting at o. Always inlined into the
// two kernels below, so that each is compiled for its own instruction set.
template <typename Step, typename T, int P, int R>
ALWAYS_INLINE void dot_loop(
    const typename Step::X* x, int64_t ldx, const T* values, const uint8_t* indices,
    const Shape& s, const MaskRows& rows, const float* bias, float* y, int64_t ldy, int64_t o) {
  __m512 acc[P][R];
  const T* v[P];
  const uint8_t* dense[P];
  for (int p = 0; p < P; ++p) {
    v[p] = values + (o + p) * s.slots;
    dense[p] = rows.build(p, indices + (o + p) * s.index_bytes, s);
    for (int r = 0; r < R; ++r) acc[p][r] = _mm512_setzero_ps();
  }
  typedef typename Step::Lanes Lanes;
  for (int64_t k0 = 0; k0 < s.in; k0 += 64) {
    const uint64_t valid = s.in - k0 >= 64 ? ~0ull : (1ull << (s.in - k0)) - 1;
    uint64_t mask[P];
    for (int p = 0; p < P; ++p) {
      memcpy(&mask[p], dense[p] + k0 / 8, 8);
      mask[p] &= valid;
      _mm_prefetch(reinterpret_cast<const char*>(v[p]) + 1024, _MM_HINT_T0);
    }
#pragma GCC unroll 1
    for (int q = 0; q < 64 / Step::WIDTH; ++q) {
      const Lanes lanes = (Lanes)(valid >> (Step::WIDTH * q));
      if (!lanes) break;
      typename Step::XVec xr[R];
      for (int r = 0; r < R; ++r) xr[r] = Step::load_x(lanes, x + r * ldx + k0 + Step::WIDTH * q);
      for (int p = 0; p < P; ++p) {
        const Lanes part = (Lanes)(mask[p] >> (Step::WIDTH * q));
        const auto w = Step::expand(part, v[p]);
        v[p] += __builtin_popcount(part);
        for (int r = 0; r < R; ++r) acc[p][r] = Step::madd(acc[p][r], w, xr[r]);
      }
    }
  }
  for (int p = 0; p < P; ++p)
    for (int r = 0; r < R; ++r)
      y[r * ldy + o + p] = _mm512_reduce_add_ps(acc[p][r]) + (bias ? bias[o + p] : 0.0f);
}

// fp32 x; fp32 or bf16 weights.
template <typename T, int P, int R>
void dot_f32(const float* x, int64_t ldx, const T* values, const uint8_t* indices,
             const Shape& s, const MaskRows& rows, const float* bias, float* y, int64_t ldy,
             int64_t o) {
  dot_loop<Fp32Step, T, P, R>(x, ldx, values, indices, s, rows, bias, y, ldy, o);
}

// bf16 weights and bf16 x.
template <int P, int R>
BF16_TARGET void dot_bf16(const bf16_t* x, int64_t ldx, const bf16_t* values,
                          const uint8_t* indices, const Shape& s, const MaskRows& rows,
                          const float* bias, float* y, int64_t ldy, int64_t o) {
  dot_loop<Bf16Step, bf16_t, P, R>(x, ldx, values, indices, s, rows, bias, y, ldy, o);
}

// Output rows [begin, end) for R rows of x: blocks of P, then single rows.
template <typename X, typename T, int R>
void dot_rows(const X* x, int64_t ldx, const T* values, const uint8_t* indices, const Shape& s,
              const MaskRows& masks, const float* bias, float* y, int64_t ldy, int64_t begin,
              int64_t end, bool bf16_dot);

template <int P, int R, typename T>
inline void dot_one(const void* x, int64_t ldx, const T* values, const uint8_t* indices,
                    const Shape& s, const MaskRows& masks, const float* bias, float* y,
                    int64_t ldy, int64_t o, bool bf16_dot) {
  if constexpr (sizeof(T) == 2) {
    if (bf16_dot) {
      dot_bf16<P, R>(static_cast<const bf16_t*>(x), ldx, values, indices, s, masks, bias, y,
                     ldy, o);
      return;
    }
  }
  dot_f32<T, P, R>(static_cast<const float*>(x), ldx, values, indices, s, masks, bias, y, ldy,
                   o);
}

template <int R, typename T>
void dot_range(const void* x, int64_t ldx, const T* values, const uint8_t* indices,
               const Shape& s, const MaskRows& masks, const float* bias, float* y, int64_t ldy,
               int64_t begin, int64_t end, bool bf16_dot) {
  constexpr int P = R <= 2 ? 4 : R <= 4 ? 3 : 2;
  int64_t o = begin;
  for (; o + P <= end; o += P)
    dot_one<P, R, T>(x, ldx, values, indices, s, masks, bias, y, ldy, o, bf16_dot);
  for (; o < end; ++o)
    dot_one<1, R, T>(x, ldx, values, indices, s, masks, bias, y, ldy, o, bf16_dot);
}

template <typename T>
void dot_any(int rows, const void* x, int64_t ldx, const T* values, const uint8_t* indices,
             const Shape& s, const MaskRows& masks, const float* bias, float* y, int64_t ldy,
             int64_t begin, int64_t end, bool bf16_dot) {
  switch (rows) {
#define NMSPARSE_DOT(R) \
    case R: dot_range<R, T>(x, ldx, values, indices, s, masks, bias, y, ldy, begin, end, bf16_dot); break;
    NMSPARSE_DOT(1) NMSPARSE_DOT(2) NMSPARSE_DOT(3) NMSPARSE_DOT(4)
    NMSPARSE_DOT(5) NMSPARSE_DOT(6) NMSPARSE_DOT(7) NMSPARSE_DOT(8)
#undef NMSPARSE_DOT
  }
}

// The dot kernel takes the rows 8 at a time (accumulators: P x R <= 16 of the 32 registers).
constexpr int DOT_MAX_ROWS = 8;

// -------------------------------------------------------------- table kernel (many rows)

// Input features per block: a multiple of 16 * m (so a block holds whole chunks of 16 values)
// with the block of xt (KB x lanes fp32) about 192 KiB.
int64_t block_inputs(int m, int lanes) {
  int64_t kb = (192 << 10) / (4 * lanes);
  const int64_t unit = 16 * m;
  kb = kb / unit * unit;
  return kb < unit ? unit : kb;
}

// Rows of zeros after a block of xt: a position field of up to 4 bits holds at most 15
// whatever m is (8-bit ones are clamped to m - 1), so even a corrupt index never reads
// outside the buffer.
constexpr int64_t PAD_ROWS = 16;

inline __m512 broadcast(const float* p) { return _mm512_set1_ps(*p); }
inline __m512 broadcast(const bf16_t* p) { return _mm512_set1_ps(scalar_f32(*p)); }

// Offsets (in floats, relative to the block) of values [j, j + count) of one output row.
template <int W>
inline void block_offsets(const uint8_t* bits, int n, int m, int64_t j, int64_t count,
                          int64_t k_first, int64_t lanes, int32_t* offsets) {
  const __m512i field = _mm512_set1_epi32((1 << W) - 1);
  __m512i shifts, in_chunk;
  __mmask16 high = 0;
  {
    alignas(64) int32_t sh[16], ic[16];
    for (int l = 0; l < 16; ++l) {
      sh[l] = (W * l) & 31;
      ic[l] = l / n * m;
      if (W * l >= 32) high |= (__mmask16)(1u << l);
    }
    shifts = _mm512_load_si512(sh);
    in_chunk = _mm512_load_si512(ic);
  }
  const __m512i lanes_v = _mm512_set1_epi32((int)lanes);
  const __m512i last = _mm512_set1_epi32(m - 1);
  int64_t k = 0;
  for (; k + 16 <= count; k += 16) {  // j + k is a multiple of 16
    __m512i pos;
    if constexpr (W == 8) {  // one byte per position; a corrupt one (>= m) is clamped
      pos = _mm512_min_epu32(_mm512_cvtepu8_epi32(_mm_loadu_si128(
          reinterpret_cast<const __m128i*>(bits + j + k))), last);
    } else {
      uint64_t word = 0;
      memcpy(&word, bits + (j + k) * W / 8, 2 * W);
      const __m512i both = _mm512_mask_blend_epi32(high, _mm512_set1_epi32((int)(uint32_t)word),
                                                   _mm512_set1_epi32((int)(word >> 32)));
      pos = _mm512_and_si512(_mm512_srlv_epi32(both, shifts), field);
    }
    const int base = (int)((j + k) / n * m - k_first);
    const __m512i at = _mm512_add_epi32(_mm512_add_epi32(pos, in_chunk), _mm512_set1_epi32(base));
    _mm512_storeu_si512(offsets + k, _mm512_mullo_epi32(at, lanes_v));
  }
  for (; k < count; ++k) {
    const int64_t bit = (j + k) * W;
    int64_t pos = (bits[bit >> 3] >> (bit & 7)) & ((1 << W) - 1);
    if (pos >= m) pos = m - 1;
    offsets[k] = (int32_t)(((j + k) / n * m + pos - k_first) * lanes);
  }
}

// One block of values [j, j + count) of output row o: acc (V vectors of 16 lanes) += value *
// xt row. C independent chains hide the FMA latency when V is small.
template <typename T, int V>
inline void table_row(const float* xt, const T* v, const int32_t* offsets, int64_t count,
                      float* acc_out) {
  constexpr int C = V >= 4 ? 1 : 4 / V;
  __m512 acc[C][V];
  for (int c = 0; c < C; ++c)
    for (int t = 0; t < V; ++t) acc[c][t] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + C <= count; j += C)
    for (int c = 0; c < C; ++c) {
      const __m512 w = broadcast(v + j + c);
      const float* xr = xt + offsets[j + c];
      for (int t = 0; t < V; ++t) acc[c][t] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xr + 16 * t), acc[c][t]);
    }
  for (; j < count; ++j) {
    const __m512 w = broadcast(v + j);
    const float* xr = xt + offsets[j];
    for (int t = 0; t < V; ++t) acc[0][t] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xr + 16 * t), acc[0][t]);
  }
  for (int t = 0; t < V; ++t) {
    __m512 sum = acc[0][t];
    for (int c = 1; c < C; ++c) sum = _mm512_add_ps(sum, acc[c][t]);
    _mm512_store_ps(acc_out + 16 * t, _mm512_add_ps(_mm512_load_ps(acc_out + 16 * t), sum));
  }
}

// rows (<= 16 * V) rows of x (fp32, row stride ldx) for output rows [begin, end); xt and yt
// are this thread's buffers.
template <typename T, int W, int V>
void table_range(const float* x, int64_t ldx, int64_t rows, const T* values,
                 const uint8_t* indices, const Shape& s, const float* bias, float* y,
                 int64_t ldy, int64_t begin, int64_t end, float* xt, float* yt,
                 int32_t* offsets) {
  constexpr int64_t lanes = 16 * V;
  const int64_t kb = block_inputs(s.m, (int)lanes);
  const int64_t vals_per_block = kb / s.m * s.n;
  memset(yt, 0, sizeof(float) * lanes * (end - begin));
  for (int64_t k_first = 0; k_first < s.in; k_first += kb) {
    const int64_t k_count = s.in - k_first < kb ? s.in - k_first : kb;
    for (int64_t k = 0; k < k_count + PAD_ROWS; ++k) {
      float* dst = xt + k * lanes;
      int64_t r = 0;
      if (k < k_count)
        for (; r < rows; ++r) dst[r] = x[r * ldx + k_first + k];
      for (; r < lanes; ++r) dst[r] = 0.0f;
    }
    const int64_t j = k_first / s.m * s.n;
    const int64_t count = (j + vals_per_block < s.slots ? j + vals_per_block : s.slots) - j;
    for (int64_t o = begin; o < end; ++o) {
      const uint8_t* bits = indices + o * s.index_bytes;
      block_offsets<W>(bits, s.n, s.m, j, count, k_first, lanes, offsets);
      table_row<T, V>(xt, values + o * s.slots + j, offsets, count, yt + (o - begin) * lanes);
    }
  }
  for (int64_t o = begin; o < end; ++o) {
    const float b = bias ? bias[o] : 0.0f;
    for (int64_t r = 0; r < rows; ++r) y[r * ldy + o] = yt[(o - begin) * lanes + r] + b;
  }
}

template <typename T, int W>
void table_any(const float* x, int64_t ldx, int64_t rows, const T* values,
               const uint8_t* indices, const Shape& s, const float* bias, float* y, int64_t ldy,
               int64_t begin, int64_t end, float* xt, float* yt, int32_t* offsets) {
  if (rows <= 16)
    table_range<T, W, 1>(x, ldx, rows, values, indices, s, bias, y, ldy, begin, end, xt, yt, offsets);
  else if (rows <= 32)
    table_range<T, W, 2>(x, ldx, rows, values, indices, s, bias, y, ldy, begin, end, xt, yt, offsets);
  else if (rows <= 48)
    table_range<T, W, 3>(x, ldx, rows, values, indices, s, bias, y, ldy, begin, end, xt, yt, offsets);
  else
    table_range<T, W, 4>(x, ldx, rows, values, indices, s, bias, y, ldy, begin, end, xt, yt, offsets);
}

constexpr int64_t TABLE_ROWS = 64;

// One dense bf16 row of `in` inputs (row) from its packed values (v) and its dense mask
// (MaskRows::build): 32 inputs per step, the kept values moved to their places by expands.
// Writes exactly row[0, in).
inline void expand_row_bf16(const uint8_t* dense, const bf16_t* v, int64_t in, bf16_t* row) {
  for (int64_t k0 = 0; k0 < in; k0 += 32) {
    uint32_t mask;
    memcpy(&mask, dense + k0 / 8, 4);
    const __mmask32 lanes = in - k0 >= 32 ? ~0u : (1u << (in - k0)) - 1;
    mask &= lanes;
    const int count = __builtin_popcount(mask);
    const __m512i raw = _mm512_maskz_loadu_epi16((__mmask32)((1ull << count) - 1), v);
    // vpermw-free expand of 16-bit lanes: widen to 32-bit, expand two halves, narrow
    const __m512i lo = _mm512_maskz_expand_epi32((__mmask16)mask, _mm512_cvtepu16_epi32(_mm512_castsi512_si256(raw)));
    const int count_lo = __builtin_popcount(mask & 0xFFFF);
    const __m512i rest = _mm512_maskz_loadu_epi16((__mmask32)((1ull << (count - count_lo)) - 1), v + count_lo);
    const __m512i hi = _mm512_maskz_expand_epi32((__mmask16)(mask >> 16), _mm512_cvtepu16_epi32(_mm512_castsi512_si256(rest)));
    _mm256_mask_storeu_epi16(row + k0, (__mmask16)lanes, _mm512_cvtepi32_epi16(lo));
    _mm256_mask_storeu_epi16(row + k0 + 16, (__mmask16)(lanes >> 16), _mm512_cvtepi32_epi16(hi));
    v += count;
  }
}

// A 2 MiB-aligned buffer of at least `bytes`, kept by the calling thread between calls
// (slot 0 or 1): a layer runs every step, and fresh pages from the system cost a fault and a
// zeroing each call (about a tenth of a 16-row call). With transparent huge pages the block
// is one physically contiguous page, so what lies in it cannot evict itself from L2 by the
// chance of where 4 KiB pages land. nullptr when out of memory.
inline char* scratch(int slot, int64_t bytes) { return nmsparse_kept_scratch(slot, bytes); }


// ------------------------------------------------- pair table kernel (many rows, bf16, M <= 8)
//
// vdpbf16ps multiplies pairs: lane r gets w0 * x0 + w1 * x1. Values 2p and 2p + 1 of a row
// (the pair p) lie in one "unit" of the input: one group when N is even, two groups when N = 1;
// their positions (a, b) pick two inputs of the unit. The rows of x sit in the lanes (16 per
// zmm, V zmm for up to 16 V rows). For every unit and every (a, b) a table entry holds the
// pair (x[r][unit + a], x[r][unit + b']) of each row r (b' = b, or M + b for N = 1); each pair
// of kept weights is broadcast as one 32-bit word and meets its entry in one vdpbf16ps: two
// kept products per lane and instruction, none with a pruned weight, so 2:4 needs half the
// instructions of the dense product. Where the entry sits comes straight from the pair's
// position bits (a + M b; pext for M = 8): no table of offsets.
//
// What caps it is loading: one 64-byte entry per instruction, and the accumulators. So the
// loops nest, per thread: rows in blocks of 64 (x transposed once into a buffer the threads
// share); outputs in panels whose fp32 accumulators stay in L2; inputs in superblocks whose
// table (every (a, b) of every unit, built once per panel) stays in L2; and slices of a few
// dozen pairs, over which every output of the panel goes in turn, two at a time, so that the
// entries a slice touches are reused from L1 while the outputs' weights stream in (prefetched:
// one output's slice is a few lines, 4 KiB or more from the next output's, which the hardware
// prefetchers do not follow). Measured on a Zen 4 core at 64 rows: about 0.46 ns per
// instruction in this loop (vdpbf16ps alone: 0.28 ns); oneDNN's dense bf16 GEMM needs twice
// the instructions at about 0.31 ns each.

constexpr int64_t PAIR_ROWS = 64;             // rows per block: up to 4 zmm of lanes
constexpr int64_t PAIR_TABLE_BYTES = 128 << 10;  // one superblock's table (L2)
constexpr int64_t PAIR_PANEL = 512;           // outputs whose accumulators stay in L2
constexpr int64_t PAIR_AHEAD = 8;             // outputs ahead whose weights are prefetched
// Pairs per slice by V (1-4): enough work per output and slice to pay for loading and
// storing its accumulators, few enough units that their entries mostly stay in L1. Measured
// on 2:4, 2:8 and 1:4 (11008x4096, Zen 4); the best differ little between patterns.
constexpr int64_t PAIR_SLICE[5] = {0, 96, 64, 48, 40};

bool pairs_ok(const Shape& s) { return power_of_two(s.m) && s.m <= 8 && (s.n == 1 || s.n % 2 == 0); }

// Position bits of the 8 pairs from pair p (a multiple of 8) of one row: 2 W bits each.
template <int W>
inline uint64_t pair_bits(const uint8_t* row, int64_t index_bytes, int64_t p) {
  const int64_t byte = p * 2 * W / 8;
  uint64_t word = 0;
  if (index_bytes - byte >= 8) {
    memcpy(&word, row + byte, 8);
  } else {  // the row's last bytes: never read past them
    for (int64_t i = byte; i < index_bytes && i < byte + 2 * W; ++i)
      word |= (uint64_t)row[i] << (8 * (i - byte));
  }
  return word;
}

// The table entry of a pair from its 2 W position bits: a + M b (a corrupt position >= M
// reads a wrong entry of the same unit, never outside the table).
template <int M, int W>
inline uint64_t pair_entry(uint64_t code) {
  if (M == (1 << W)) return code & (M * M - 1);
  return _pext_u64(code, 0x77);  // M = 8, W = 4
}

// Bytes of one unit's entries in the table: one entry more than M * M, so that the units do
// not all start at the same offset within 4 KiB (the same cache sets).
template <int V, int M>
constexpr int64_t pair_unit_bytes() { return (M * M + 1) * 64 * V; }

// The table buffer: a superblock, at least one slice (8 units) of the largest unit.
inline int64_t pair_table_bytes() {
  const int64_t slice = 8 * pair_unit_bytes<4, 8>();
  return PAIR_TABLE_BYTES > slice ? PAIR_TABLE_BYTES : slice;
}

inline uint32_t pair_word(const bf16_t* v) {
  uint32_t word;
  memcpy(&word, v, 4);
  return word;
}

// For O consecutive output rows (values v, index bytes row_bits, accumulators acc_out, each
// the next row's a stride further): acc_out (16 V floats) += the products of pairs [p, p +
// count); table is the entries of the unit of pair p (p a multiple of 8; PPU pairs per unit).
template <int V, int M, int W, int PPU, int O>
BF16_TARGET inline void pair_slice(const char* table, const bf16_t* v, int64_t slots,
                                   const uint8_t* row_bits, int64_t index_bytes, int64_t p,
                                   int64_t count, float* acc_out) {
  constexpr int K = 8 / (O * V) > 1 ? 8 / (O * V) : 1;  // chains: vdpbf16ps has a long latency
  constexpr int64_t ENTRY = 64 * V, UNIT = pair_unit_bytes<V, M>(), LANES = 16 * V;
  __m512 acc[O][K][V];
  for (int i = 0; i < O; ++i)
    for (int c = 0; c < K; ++c)
      for (int t = 0; t < V; ++t)
        acc[i][c][t] = c ? _mm512_setzero_ps() : _mm512_load_ps(acc_out + i * LANES + 16 * t);
  int64_t j = 0;
  for (; j + 8 <= count; j += 8) {
    uint64_t bits[O];
    for (int i = 0; i < O; ++i) bits[i] = pair_bits<W>(row_bits + i * index_bytes, index_bytes, p + j);
    const char* unit = table + j / PPU * UNIT;
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c)
      for (int i = 0; i < O; ++i) {
        const char* x = unit + c / PPU * UNIT + pair_entry<M, W>(bits[i] >> (2 * W * c)) * ENTRY;
        // one register per pair, the V loads at displacements from it (with one load, the
        // compiler folds the address into it: an instruction less per pair)
        if constexpr (V > 1) __asm__("" : "+r"(x));
        const __m512bh w = (__m512bh)_mm512_set1_epi32((int)pair_word(v + i * slots + 2 * (j + c)));
        for (int t = 0; t < V; ++t)
          acc[i][c % K][t] = _mm512_dpbf16_ps(acc[i][c % K][t], w, (__m512bh)_mm512_load_si512(x + 64 * t));
      }
  }
  if (j < count)
    for (int i = 0; i < O; ++i) {
      const uint64_t bits = pair_bits<W>(row_bits + i * index_bytes, index_bytes, p + j);
      for (int c = 0; j + c < count; ++c) {
        const char* x = table + (j + c) / PPU * UNIT + pair_entry<M, W>(bits >> (2 * W * c)) * ENTRY;
        const __m512bh w = (__m512bh)_mm512_set1_epi32((int)pair_word(v + i * slots + 2 * (j + c)));
        for (int t = 0; t < V; ++t)
          acc[i][0][t] = _mm512_dpbf16_ps(acc[i][0][t], w, (__m512bh)_mm512_load_si512(x + 64 * t));
      }
    }
  for (int i = 0; i < O; ++i)
    for (int t = 0; t < V; ++t) {
      __m512 sum = acc[i][0][t];
      for (int c = 1; c < K; ++c) sum = _mm512_add_ps(sum, acc[i][c][t]);
      _mm512_store_ps(acc_out + i * LANES + 16 * t, sum);
    }
}

// Every (a, b) entry of units [u_first, u_first + units) from x transposed (xt: the lanes of
// input k at xt + k * 16 V, zero past the inputs).
template <int V, int M>
BF16_TARGET void pair_table(const bf16_t* xt, bool one, int64_t u_first, int64_t units, char* table) {
  constexpr int64_t lanes = 16 * V;
  const int64_t unit_inputs = one ? 2 * M : M, b_shift = one ? M : 0;
  for (int64_t u = 0; u < units; ++u) {
    const bf16_t* base = xt + (u_first + u) * unit_inputs * lanes;
    for (int b = 0; b < M; ++b)
      for (int a = 0; a < M; ++a) {
        const bf16_t* xa = base + a * lanes;
        const bf16_t* xb = base + (b_shift + b) * lanes;
        char* dst = table + u * pair_unit_bytes<V, M>() + (b * M + a) * 64 * V;
        for (int t = 0; t < V; ++t) {
          const __m512i lo = _mm512_cvtepu16_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(xa + 16 * t)));
          const __m512i hi = _mm512_cvtepu16_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(xb + 16 * t)));
          _mm512_store_si512(dst + 64 * t, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
        }
      }
  }
}

// Outputs [begin, end) for one block of rows (<= 16 V) whose transposed x is xt; table and
// yt are this thread's buffers (PAIR_TABLE_BYTES, PAIR_PANEL * 16 V floats).
template <int V, int M, int W, int PPU, int OUTS>
BF16_TARGET void pair_range(const bf16_t* x, int64_t ldx, int64_t rows, const bf16_t* xt,
                            const bf16_t* values, const uint8_t* indices, const Shape& s,
                            const float* bias, float* y, int64_t ldy, int64_t begin, int64_t end,
                            char* table, float* yt) {
  constexpr int64_t lanes = 16 * V, UNIT = pair_unit_bytes<V, M>();
  const bool one = s.n == 1;
  const int64_t pairs = s.slots / 2;
  // pairs per slice and per superblock (whole slices; both at least 8 pairs: the table
  // buffer holds 8 units of the largest kind)
  const int64_t fit = PAIR_TABLE_BYTES / UNIT * PPU;
  int64_t slice = (PAIR_SLICE[V] < fit ? PAIR_SLICE[V] : fit) / 8 * 8;
  if (slice < 8) slice = 8;
  int64_t super = fit / slice * slice;
  if (super < slice) super = slice;
  for (int64_t o0 = begin; o0 < end; o0 += PAIR_PANEL) {
    const int64_t o1 = o0 + PAIR_PANEL < end ? o0 + PAIR_PANEL : end;
    memset(yt, 0, sizeof(float) * lanes * (o1 - o0));
    for (int64_t p0 = 0; p0 < pairs; p0 += super) {
      const int64_t p1 = p0 + super < pairs ? p0 + super : pairs;
      pair_table<V, M>(xt, one, p0 / PPU, (p1 - p0 + PPU - 1) / PPU, table);
      for (int64_t q = p0; q < p1; q += slice) {
        const int64_t count = p1 - q < slice ? p1 - q : slice;
        const char* t = table + (q - p0) / PPU * UNIT;
        // the weights of one (output, slice) are a few lines 4 KiB or more apart from the
        // next output's: fetch them PAIR_AHEAD outputs ahead (the prefetchers do not)
        const int64_t value_bytes = 4 * count, bit_bytes = (2 * W * count + 7) / 8 + 1;
        for (int64_t o = o0; o < o1; o += OUTS) {
          for (int64_t f = o + PAIR_AHEAD; f < o + PAIR_AHEAD + OUTS && f < o1; ++f) {
            const char* v = reinterpret_cast<const char*>(values + f * s.slots + 2 * q);
            for (int64_t at = 0; at < value_bytes + 63; at += 64)
              _mm_prefetch(v + (at < value_bytes ? at : value_bytes - 1), _MM_HINT_T0);
            const char* b = reinterpret_cast<const char*>(indices + f * s.index_bytes + q * 2 * W / 8);
            _mm_prefetch(b, _MM_HINT_T0);
            _mm_prefetch(b + bit_bytes - 1, _MM_HINT_T0);
            for (int t = 0; t < V; ++t)
              _mm_prefetch(reinterpret_cast<const char*>(yt + (f - o0) * lanes + 16 * t), _MM_HINT_T0);
          }
          if (o + OUTS <= o1)
            pair_slice<V, M, W, PPU, OUTS>(t, values + o * s.slots + 2 * q, s.slots, indices + o * s.index_bytes,
                                           s.index_bytes, q, count, yt + (o - o0) * lanes);
          else
            for (int64_t i = o; i < o1; ++i)
              pair_slice<V, M, W, PPU, 1>(t, values + i * s.slots + 2 * q, s.slots, indices + i * s.index_bytes,
                                          s.index_bytes, q, count, yt + (i - o0) * lanes);
        }
      }
    }
    const bool odd = s.slots % 2;  // N = 1 with an odd number of groups: the last value alone
    if (odd || bias)
      for (int64_t o = o0; o < o1; ++o) {
        const float b = bias ? bias[o] : 0.0f;
        float* acc = yt + (o - o0) * lanes;
        if (odd) {
          const int64_t j = s.slots - 1, bit = j * W;
          const int64_t at = j / s.n * M + ((indices[o * s.index_bytes + (bit >> 3)] >> (bit & 7)) & (M - 1));
          const float last = scalar_f32(values[o * s.slots + j]);
          for (int64_t r = 0; r < rows; ++r) acc[r] = acc[r] + last * scalar_f32(x[r * ldx + at]) + b;
        } else {
          for (int64_t r = 0; r < rows; ++r) acc[r] += b;
        }
      }
    for (int64_t r = 0; r < rows; ++r)  // y row by row: contiguous stores
      for (int64_t o = o0; o < o1; ++o) y[r * ldy + o] = yt[(o - o0) * lanes + r];
  }
}

template <int V>
BF16_TARGET void pair_any(const bf16_t* x, int64_t ldx, int64_t rows, const bf16_t* xt,
                          const bf16_t* values, const uint8_t* indices, const Shape& s,
                          const float* bias, float* y, int64_t ldy, int64_t begin, int64_t end,
                          char* table, float* yt) {
  if (s.m == 2)
    pair_range<V, 2, 1, 1, 2>(x, ldx, rows, xt, values, indices, s, bias, y, ldy, begin, end, table, yt);
  else if (s.m == 4)
    pair_range<V, 4, 2, 1, 2>(x, ldx, rows, xt, values, indices, s, bias, y, ldy, begin, end, table, yt);
  else if (s.n == 4)
    pair_range<V, 8, 4, 2, 2>(x, ldx, rows, xt, values, indices, s, bias, y, ldy, begin, end, table, yt);
  else
    pair_range<V, 8, 4, 1, 2>(x, ldx, rows, xt, values, indices, s, bias, y, ldy, begin, end, table, yt);
}

// Threads' share of transposing rows [first, first + rows) of x into xt (16 V lanes per
// input, zero past the rows and past the inputs up to k_padded).
inline void pair_transpose(const bf16_t* x, int64_t ldx, int64_t rows, int64_t lanes,
                           int64_t k_count, int64_t k_padded, bf16_t* xt) {
  const int64_t threads = omp_get_num_threads(), me = omp_get_thread_num();
  const int64_t k_begin = k_padded * me / threads, k_end = k_padded * (me + 1) / threads;
  for (int64_t k = k_begin; k < k_end; ++k) {
    bf16_t* dst = xt + k * lanes;
    int64_t r = 0;
    if (k < k_count)
      for (; r < rows; ++r) dst[r] = x[r * ldx + k];
    for (; r < lanes; ++r) dst[r] = 0;
  }
}


// This thread's share [begin, end) of the output rows, in multiples of 16.
inline void share(int64_t out, int64_t& begin, int64_t& end) {
  const int64_t threads = omp_get_num_threads(), me = omp_get_thread_num();
  const int64_t units = (out + 15) / 16;
  begin = units * me / threads * 16;
  end = units * (me + 1) / threads * 16;
  if (end > out) end = out;
  if (begin > out) begin = out;
}

}  // namespace
