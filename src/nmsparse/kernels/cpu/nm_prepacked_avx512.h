// The "prepacked" lanes kernel of the AVX-512 library (entry points in
// nm_prepacked_avx512.cpp; it shares nm_lanes_avx512.h's lane math): the same product as the lanes kernel, but
// the weight was laid out lane by lane once, when the layer was prepared
// (nmsparse_lanes_pack), instead of on every call. Per call the lanes kernel spends about as
// long transposing the packed rows into its lane layout as it spends computing at 8 rows;
// here nothing is laid out, and the bytes read are the same as the packed format's.
//
// The layout ("lanes layout"), per block of 16 outputs (outputs past the last: zeros), over
// E = (windows + 3) * pairs-per-window entries (entry t * PW + q: step t, pair slot q; the
// lanes 4k .. 4k + 3 of step t hold the pair of slot q of window t - 3 + k, as LaneSkew
// places them):
//   E x 16 weight words (the pair's two bf16 values, values 2q and 2q + 1 of the window,
//   the first in the low half), then
//   E x CODE_BYTES codes: the pair's two positions (w bits each, the first in the low bits),
//   one nibble per lane for M <= 4 (8 bytes per entry, lane l in nibble l), one byte per
//   lane for M = 8 and for M = 16's N:8 view (16 bytes).
// Entries with no pair (windows outside the row, pairs past the last value) have weight 0 and
// code 0: they meet x loaded as zeros (the row's edge steps load masked), so no padded product
// can be 0 * inf; lanes past the last output are never stored. A slot's zero partner (odd
// counts, M = 16's padding) has weight 0 at a position of its window, so it can meet an inf
// input, as the dense product's pruned zeros do.
//
// The codes become vpshufb controls in registers: M <= 4, one vpmultishiftqb brings lane l's
// nibble to the low bits of dword l and vpermd maps it through the slot's table
// (lane_tables); M = 8, the byte's two nibbles (a, b) map through two tables.
#pragma once

#include "nm_lanes_avx512.h"

namespace {

// A pattern the layout takes: M in {2, 4, 8} and any N < M, or M = 16 and N <= 7 (its N:8
// view, below); the entry points check it.
// Unlike the lanes kernel, N may be odd: a window's odd value count leaves its last pair slot
// one value and a zero weight at the same position (M = 8), and with M = 4 a pair may span
// two groups (3:4: lane_offsets).
inline bool lanes_pattern_ok(const Shape& s) {
  return power_of_two(s.m) && s.m >= 2 && s.m <= 16 && s.n >= 1 && s.n < s.m && s.n < 8;
}

inline int lanes_code_bytes(const Shape& s) { return s.m == 8 ? 16 : 8; }
inline int64_t lanes_entries(const Shape& s) { return ((s.in + 7) / 8 + 3) * lane_pairs_per_window(s); }
// whole cache lines, so every block starts on one
inline int64_t lanes_block_bytes(const Shape& s) { return (lanes_entries(s) * (64 + lanes_code_bytes(s)) + 63) / 64 * 64; }
inline int64_t lanes_bytes(const Shape& s) { return (s.out + 15) / 16 * lanes_block_bytes(s); }

// Where a pair of output o lives in a layout: its weight word, its code's byte, and the
// code's shift within that byte (M <= 4: nibbles); and which values of the row it holds
// (second: -1 when the slot has one value).
struct LanesSlot {
  int64_t word, code;
  int shift;
  int64_t first, second;
};

// Calls visit(o, slot) for every pair of every output o, in order.
template <typename Visit>
inline void lanes_each_pair(const Shape& s, Visit visit) {
  const int per_window = lane_pairs_per_window(s), code_bytes = lanes_code_bytes(s);
  const int values_per_window = lane_values_per_window(s);
  const int64_t windows = (s.in + 7) / 8, entries = lanes_entries(s);
  for (int64_t o = 0; o < s.out; ++o) {
    const int lane = (int)(o % 16);
    const int64_t base = o / 16 * lanes_block_bytes(s);
    for (int64_t g = 0; g < windows; ++g)
      for (int q = 0; q < per_window; ++q) {
        const int64_t first = g * values_per_window + 2 * q;
        if (first >= s.slots) break;
        const bool two = 2 * q + 1 < values_per_window && first + 1 < s.slots;
        const int64_t step = g + 3 - lane / 4, entry = step * per_window + q;
        const int64_t code = base + entries * 64 + entry * code_bytes + (code_bytes == 16 ? lane : lane / 2);
        visit(o, LanesSlot{base + (entry * 16 + lane) * 4, code, code_bytes == 16 ? 0 : 4 * (lane % 2), first,
                           two ? first + 1 : -1});
      }
  }
}

// Position bits of value v of row o (w bits; w divides 8, so they never straddle a byte).
inline uint32_t lanes_position(const uint8_t* indices, const Shape& s, int64_t o, int64_t v) {
  const int64_t bit = v * s.w;
  return (indices[o * s.index_bytes + (bit >> 3)] >> (bit & 7)) & ((1u << s.w) - 1);
}

// ORs position bits into value v of row o (the indices start zeroed).
inline void lanes_put_position(uint8_t* indices, const Shape& s, int64_t o, int64_t v, uint32_t position) {
  const int64_t bit = v * s.w;
  indices[o * s.index_bytes + (bit >> 3)] |= (uint8_t)(position << (bit & 7));
}

// Packed (values, indices) -> lanes layout (dst: lanes_bytes, written whole). A slot with one
// value repeats its position for the zero partner, so no new input is read.
inline void lanes_pack(const bf16_t* values, const uint8_t* indices, const Shape& s, uint8_t* dst) {
  memset(dst, 0, (size_t)lanes_bytes(s));
  lanes_each_pair(s, [&](int64_t o, const LanesSlot& at) {
    const uint32_t low = values[o * s.slots + at.first];
    const uint32_t high = at.second >= 0 ? values[o * s.slots + at.second] : 0;
    const uint32_t word = low | high << 16;
    memcpy(dst + at.word, &word, 4);
    const uint32_t a = lanes_position(indices, s, o, at.first);
    const uint32_t b = at.second >= 0 ? lanes_position(indices, s, o, at.second) : a;
    dst[at.code] |= (uint8_t)((a | b << s.w) << at.shift);
  });
}

// The inverse: lanes layout -> packed (values, indices), written whole.
inline void lanes_unpack(const uint8_t* src, const Shape& s, bf16_t* values, uint8_t* indices) {
  memset(values, 0, (size_t)(s.out * s.slots * 2));
  memset(indices, 0, (size_t)(s.out * s.index_bytes));
  const uint32_t mask = (1u << s.w) - 1;
  lanes_each_pair(s, [&](int64_t o, const LanesSlot& at) {
    uint32_t word;
    memcpy(&word, src + at.word, 4);
    const uint32_t field = src[at.code] >> at.shift;
    values[o * s.slots + at.first] = (bf16_t)word;
    lanes_put_position(indices, s, o, at.first, field & mask);
    if (at.second >= 0) {
      values[o * s.slots + at.second] = (bf16_t)(word >> 16);
      lanes_put_position(indices, s, o, at.second, (field >> s.w) & mask);
    }
  });
}

// M = 16: a group spans two windows, so the layout holds the "N:8 view" of the weight: window
// 2g takes the values of group g at positions 0-7, window 2g + 1 those at 8-15 (less 8), each
// padded to N slots with zero weights whose position has bit 3 set (the controls read 3 bits,
// so a pad meets input 0 of its window; its mark tells it from a kept zero on the way back).
// The view needs each group's low-half values before its high-half ones in the packed order
// (pack() writes ascending positions), or the way back could not restore the packed bytes:
// lanes16_order_ok checks it. N <= 7.
constexpr uint32_t LANES16_PAD = 8;

inline Shape lanes16_view(const Shape& s) {
  return Shape{s.batch, s.in, s.out, s.in / 8 * s.n, (s.in / 8 * s.n * 4 + 7) / 8, s.n, 8, 4};
}

// The shape the layout of weight shape s is built on and read with: s, or M = 16's N:8 view.
inline Shape lanes_layout_shape(const Shape& s) { return s.m == 16 ? lanes16_view(s) : s; }

// The packed N:8 view of an N:16 weight, held while it is split or merged (freed on scope
// exit; ok() is false when out of memory).
struct Lanes16Buffers {
  bf16_t* values;
  uint8_t* indices;
  explicit Lanes16Buffers(const Shape& view)
      : values(static_cast<bf16_t*>(malloc((size_t)(view.out * view.slots * 2 + 1)))),
        indices(static_cast<uint8_t*>(malloc((size_t)(view.out * view.index_bytes + 1)))) {}
  ~Lanes16Buffers() {
    free(values);
    free(indices);
  }
  Lanes16Buffers(const Lanes16Buffers&) = delete;
  Lanes16Buffers& operator=(const Lanes16Buffers&) = delete;
  bool ok() const { return values && indices; }
};

inline bool lanes16_order_ok(const uint8_t* indices, const Shape& s) {
  for (int64_t o = 0; o < s.out; ++o)
    for (int64_t g = 0; g < s.slots / s.n; ++g) {
      bool high = false;
      for (int k = 0; k < s.n; ++k) {
        const bool h = lanes_position(indices, s, o, g * s.n + k) >= 8;
        if (high && !h) return false;
        high = h;
      }
    }
  return true;
}

// Packed N:16 (shape s) <-> its N:8 view (shape v): the split fills every slot of the view
// (values8 / indices8, zeroed here); the merge (values / indices, zeroed here) returns false
// if a group does not hold exactly N unmarked values (a corrupt layout).
inline void lanes16_split(const bf16_t* values, const uint8_t* indices, const Shape& s, const Shape& v,
                          bf16_t* values8, uint8_t* indices8) {
  memset(values8, 0, (size_t)(v.out * v.slots * 2));
  memset(indices8, 0, (size_t)(v.out * v.index_bytes));
  for (int64_t o = 0; o < s.out; ++o)
    for (int64_t g = 0; g < s.slots / s.n; ++g) {
      int filled[2] = {0, 0};
      for (int k = 0; k < s.n; ++k) {
        const uint32_t position = lanes_position(indices, s, o, g * s.n + k);
        const int half = position >= 8;
        const int64_t to = (2 * g + half) * s.n + filled[half]++;
        values8[o * v.slots + to] = values[o * s.slots + g * s.n + k];
        lanes_put_position(indices8, v, o, to, position & 7);
      }
      for (int half = 0; half < 2; ++half)
        for (int k = filled[half]; k < s.n; ++k) lanes_put_position(indices8, v, o, (2 * g + half) * s.n + k, LANES16_PAD);
    }
}

inline bool lanes16_merge(const bf16_t* values8, const uint8_t* indices8, const Shape& s, const Shape& v,
                          bf16_t* values, uint8_t* indices) {
  memset(values, 0, (size_t)(s.out * s.slots * 2));
  memset(indices, 0, (size_t)(s.out * s.index_bytes));
  for (int64_t o = 0; o < s.out; ++o)
    for (int64_t g = 0; g < s.slots / s.n; ++g) {
      int64_t to = g * s.n;
      for (int64_t from = 2 * g * s.n; from < (2 * g + 2) * s.n; ++from) {
        const uint32_t code = lanes_position(indices8, v, o, from);
        if (code & LANES16_PAD) continue;
        if (to == (g + 1) * s.n) return false;
        values[o * s.slots + to] = values8[o * v.slots + from];
        lanes_put_position(indices, s, o, to++, code + (from >= (2 * g + 1) * s.n ? 8 : 0));
      }
      if (to != (g + 1) * s.n) return false;
    }
  return true;
}

// Dense bf16 rows [begin, end) of a layout (begin a multiple of 16; dst: (end - begin) x in,
// row-major): the "dense" path of a prepared layer, which multiplies tiles of the weight with
// the caller's dense GEMM (oneDNN, AMX tiles where the CPU has them). Per block and window,
// the 16 lanes' pairs (gathered from the four skewed steps) are spread over the window's 8
// columns by compares (positions are distinct within a window, padding has weight 0, so an
// OR of the matches is the value), and the 16 x 8 tile is transposed into the 16 rows.
BF16_TARGET inline void lanes_dense_block(const uint8_t* block, const Shape& s, int64_t entries, int64_t rows,
                                          uint16_t* dst, int64_t ld) {
  const int per_window = lane_pairs_per_window(s), code_bytes = lanes_code_bytes(s);
  const int64_t windows = (s.in + 7) / 8;
  const bool eight = s.m == 8;
  const uint8_t* codes = block + entries * 64;
  int first[4], second[4];
  for (int q = 0; q < per_window; ++q) lane_offsets(s, q, first[q], second[q]);
  alignas(64) int32_t nibble_shift[16];
  for (int l = 0; l < 16; ++l) nibble_shift[l] = 4 * (l % 8);
  const __m512i shifts = _mm512_load_si512(nibble_shift);
  const __m512i low16 = _mm512_set1_epi32(0xFFFF), position = _mm512_set1_epi32(s.m == 8 ? 7 : s.m - 1);
  for (int64_t g = 0; g < windows; ++g) {
    __m512i col[8];
    for (int c = 0; c < 8; ++c) col[c] = _mm512_setzero_si512();
    for (int q = 0; q < per_window; ++q) {
      // quarter k (lanes 4k .. 4k + 3) of window g sits in step g + 3 - k: its weights, and
      // its codes (dword k of a byte-per-lane entry, word k of a nibble-per-lane one)
      __m512i words = _mm512_setzero_si512(), fields;
      __m128i code = _mm_setzero_si128();
      for (int k = 0; k < 4; ++k) {
        const int64_t entry = (g + 3 - k) * per_window + q;
        words = _mm512_mask_loadu_epi32(words, (__mmask16)(0xF << (4 * k)), block + entry * 64);
        code = eight ? _mm_mask_loadu_epi32(code, (__mmask8)(1 << k), codes + entry * code_bytes)
                     : _mm_mask_loadu_epi16(code, (__mmask8)(1 << k), codes + entry * code_bytes);
      }
      if (eight) {
        fields = _mm512_cvtepu8_epi32(code);
      } else {
        const uint64_t nibbles = (uint64_t)_mm_cvtsi128_si64(code);
        const __m512i halves = _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32((int)(uint32_t)nibbles),
                                                       _mm512_set1_epi32((int)(nibbles >> 32)));
        fields = _mm512_srlv_epi32(halves, shifts);
      }
      const int w = eight ? 4 : s.w;
      const __m512i a = _mm512_add_epi32(_mm512_and_si512(fields, position), _mm512_set1_epi32(first[q]));
      const __m512i b = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(fields, w), position),
                                         _mm512_set1_epi32(second[q]));
      const __m512i lo = _mm512_and_si512(words, low16), hi = _mm512_srli_epi32(words, 16);
      for (int c = 0; c < 8; ++c) {
        const __m512i at = _mm512_set1_epi32(c);
        col[c] = _mm512_mask_or_epi32(col[c], _mm512_cmpeq_epi32_mask(a, at), col[c], lo);
        col[c] = _mm512_mask_or_epi32(col[c], _mm512_cmpeq_epi32_mask(b, at), col[c], hi);
      }
    }
    __m512i pair[4];
    for (int i = 0; i < 4; ++i) pair[i] = _mm512_or_si512(col[2 * i], _mm512_slli_epi32(col[2 * i + 1], 16));
    const __m512i t0 = _mm512_unpacklo_epi32(pair[0], pair[1]), t1 = _mm512_unpackhi_epi32(pair[0], pair[1]);
    const __m512i t2 = _mm512_unpacklo_epi32(pair[2], pair[3]), t3 = _mm512_unpackhi_epi32(pair[2], pair[3]);
    const __m512i r[4] = {_mm512_unpacklo_epi64(t0, t2), _mm512_unpackhi_epi64(t0, t2),
                          _mm512_unpacklo_epi64(t1, t3), _mm512_unpackhi_epi64(t1, t3)};
    const int64_t columns = s.in - 8 * g < 8 ? s.in - 8 * g : 8;
    // lane l = 4j + i sits in r[i]'s 128-bit part j
    if (columns == 8 && rows == 16) {
      uint16_t* at = dst + 8 * g;
#define NMSPARSE_ROW(I, J) \
      _mm_storeu_si128(reinterpret_cast<__m128i*>(at + (4 * J + I) * ld), _mm512_extracti32x4_epi32(r[I], J));
#define NMSPARSE_ROWS(I) NMSPARSE_ROW(I, 0) NMSPARSE_ROW(I, 1) NMSPARSE_ROW(I, 2) NMSPARSE_ROW(I, 3)
      NMSPARSE_ROWS(0) NMSPARSE_ROWS(1) NMSPARSE_ROWS(2) NMSPARSE_ROWS(3)
#undef NMSPARSE_ROWS
#undef NMSPARSE_ROW
      continue;
    }
    alignas(64) uint16_t tile[4][32];
    for (int i = 0; i < 4; ++i) _mm512_store_si512(tile[i], r[i]);
    for (int64_t l = 0; l < rows; ++l)
      memcpy(dst + l * ld + 8 * g, &tile[l % 4][8 * (l / 4)], (size_t)columns * 2);
  }
}

BF16_TARGET inline void lanes_dense(const uint8_t* layout, const Shape& s, int64_t begin, int64_t end,
                                    uint16_t* dst, int threads) {
  const int64_t block_bytes = lanes_block_bytes(s), entries = lanes_entries(s);
  const int64_t blocks = (end - begin + 15) / 16;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t first = begin + 16 * b, rows = end - first < 16 ? end - first : 16;
    lanes_dense_block(layout + first / 16 * block_bytes, s, entries, rows, dst + (first - begin) * s.in, s.in);
  }
}

// The code -> control maps: M <= 4 the slot tables of lane_tables; M = 8 one table per half.
struct LanesControls {
  __m512i tables[4];  // per pair slot (M <= 4 has at most 3)
  __m512i low, high;  // M = 8: a -> bytes 0-1, b -> bytes 2-3
  __m512i nibble_shift;

  BF16_TARGET explicit LanesControls(const Shape& s) {
    lane_tables(s, tables);
    uint32_t lo[16], hi[16];
    for (int f = 0; f < 16; ++f) {
      lo[f] = lane_control(f & 7, 0) & 0xFFFFu;
      hi[f] = lane_control(0, f & 7) & 0xFFFF0000u;
    }
    low = _mm512_loadu_si512(lo);
    high = _mm512_loadu_si512(hi);
    // qword g's bytes 0 and 4 take the nibbles 2g and 2g + 1 of the broadcast codes
    alignas(64) uint8_t shifts[64] = {};
    for (int g = 0; g < 8; ++g) {
      shifts[8 * g] = (uint8_t)(8 * g);
      shifts[8 * g + 4] = (uint8_t)(8 * g + 4);
    }
    nibble_shift = _mm512_load_si512(shifts);
  }

  template <bool EIGHT>
  BF16_TARGET VBMI_TARGET ALWAYS_INLINE __m512i control(const uint8_t* code, int q) const {
    if (!EIGHT) {
      uint64_t bits;
      memcpy(&bits, code, 8);
      const __m512i spread = _mm512_multishift_epi64_epi8(nibble_shift, _mm512_set1_epi64((long long)bits));
      return _mm512_permutexvar_epi32(spread, tables[q]);
    }
    const __m512i ab = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(code)));
    return _mm512_or_si512(_mm512_permutexvar_epi32(ab, low),
                           _mm512_permutexvar_epi32(_mm512_srli_epi32(ab, 4), high));
  }
};

// What prepacked_rows needs of the layout and the shape, fixed per call.
struct PrepackedPlan {
  const uint8_t* layout;
  int64_t block_bytes, entries, in, out;  // the code bytes per entry follow from EIGHT
};

// One step of R rows and BLOCKS blocks (block b's weights at w + b * block_bytes, its codes
// at c + b * block_bytes).
template <int R, int BLOCKS, int PER_WINDOW, bool EIGHT, bool CACHED>
BF16_TARGET VBMI_TARGET ALWAYS_INLINE void prepacked_step(__m512 (&acc)[R][BLOCKS], const __m512i (&xw)[R],
                                                          const uint8_t* w, const uint8_t* c, const uint32_t* cached,
                                                          const PrepackedPlan& plan, const LanesControls& controls) {
  constexpr int code_bytes = EIGHT ? 16 : 8;
  for (int q = 0; q < PER_WINDOW; ++q)
    for (int b = 0; b < BLOCKS; ++b) {
      const __m512i weights = _mm512_loadu_si512(w + b * plan.block_bytes + q * 64);
      const __m512i control = CACHED ? _mm512_load_si512(cached + (b * plan.entries + q) * 16)
                                     : controls.control<EIGHT>(c + b * plan.block_bytes + q * code_bytes, q);
      for (int r = 0; r < R; ++r)
        acc[r][b] = _mm512_dpbf16_ps(acc[r][b], (__m512bh)_mm512_shuffle_epi8(xw[r], control), (__m512bh)weights);
    }
}

// A step that reaches outside the row.
template <int R, int BLOCKS, int PER_WINDOW, bool EIGHT, bool CACHED>
BF16_TARGET VBMI_TARGET __attribute__((noinline)) void prepacked_edge(__m512 (&acc)[R][BLOCKS], const bf16_t* x, int64_t ldx,
                                                     const PrepackedPlan& plan, const uint8_t* w,
                                                     const uint8_t* c, const uint32_t* cached, int64_t t,
                                                     const LanesControls& controls) {
  __m512i xw[R];
  lane_edge_inputs<R>(xw, x, ldx, plan.in, t);
  prepacked_step<R, BLOCKS, PER_WINDOW, EIGHT, CACHED>(acc, xw, w + t * PER_WINDOW * 64,
                                                       c + t * PER_WINDOW * (EIGHT ? 16 : 8),
                                                       cached + t * PER_WINDOW * 16, plan, controls);
}

// R rows (x row stride ldx) times BLOCKS blocks from output `first` (a multiple of 16);
// steps as in lane_rows. y: fp32, row stride ldy.
template <int R, int BLOCKS, int PER_WINDOW, bool EIGHT, bool CACHED>
BF16_TARGET VBMI_TARGET void prepacked_rows(const bf16_t* x, int64_t ldx, const PrepackedPlan& plan,
                                            const LanesControls& controls, const uint32_t* cached,
                                            const float* bias, int64_t first, float* y, int64_t ldy) {
  constexpr int code_bytes = EIGHT ? 16 : 8;
  __m512 acc[R][BLOCKS];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < BLOCKS; ++b) acc[r][b] = _mm512_setzero_ps();
  const uint8_t* weights = plan.layout + first / 16 * plan.block_bytes;
  const uint8_t* codes = weights + plan.entries * 64;
  const int64_t steps = plan.entries / PER_WINDOW, middle_end = lane_middle_end(plan.in, steps);
  int64_t t = 0;
  for (; t < 3 && t < steps; ++t)
    prepacked_edge<R, BLOCKS, PER_WINDOW, EIGHT, CACHED>(acc, x, ldx, plan, weights, codes, cached, t, controls);
  for (; t < middle_end; ++t) {
    __m512i xw[R];
    for (int r = 0; r < R; ++r) xw[r] = _mm512_loadu_si512(x + r * ldx + (t - 3) * 8);
    prepacked_step<R, BLOCKS, PER_WINDOW, EIGHT, CACHED>(acc, xw, weights + t * PER_WINDOW * 64,
                                                         codes + t * PER_WINDOW * code_bytes,
                                                         cached + t * PER_WINDOW * 16, plan, controls);
  }
  for (; t < steps; ++t)
    prepacked_edge<R, BLOCKS, PER_WINDOW, EIGHT, CACHED>(acc, x, ldx, plan, weights, codes, cached, t, controls);
  lane_store<R, BLOCKS>(acc, bias, first, plan.out, y, ldy);
}

// The controls of BLOCKS blocks from output `first`, expanded once into `cached` (block b's
// entry e at cached + (b * entries + e) * 16) for a panel that more than one block of rows
// will read.
template <int BLOCKS, bool EIGHT>
BF16_TARGET VBMI_TARGET void prepacked_expand(const PrepackedPlan& plan, const LanesControls& controls,
                                              int per_window, int64_t first, uint32_t* cached) {
  constexpr int code_bytes = EIGHT ? 16 : 8;
  for (int b = 0; b < BLOCKS; ++b) {
    const uint8_t* codes = plan.layout + (first / 16 + b) * plan.block_bytes + plan.entries * 64;
    uint32_t* to = cached + b * plan.entries * 16;
    for (int64_t e = 0; e < plan.entries; ++e)
      _mm512_store_si512(to + e * 16, controls.control<EIGHT>(codes + e * code_bytes, (int)(e % per_window)));
  }
}

template <int BLOCKS, int PER_WINDOW, bool EIGHT>
BF16_TARGET void prepacked_panel(const bf16_t* x, int64_t batch, const PrepackedPlan& plan,
                                 const LanesControls& controls, uint32_t* cached, const float* bias,
                                 int64_t first, float* y) {
  const int64_t in = plan.in, out = plan.out;
  int64_t r = 0;
  if (batch > LANE_ROWS && cached) {
    prepacked_expand<BLOCKS, EIGHT>(plan, controls, PER_WINDOW, first, cached);
    for (; r + LANE_ROWS <= batch; r += LANE_ROWS)
      prepacked_rows<LANE_ROWS, BLOCKS, PER_WINDOW, EIGHT, true>(x + r * in, in, plan, controls, cached, bias, first, y + r * out, out);
  }
  for (; r + LANE_ROWS <= batch; r += LANE_ROWS)
    prepacked_rows<LANE_ROWS, BLOCKS, PER_WINDOW, EIGHT, false>(x + r * in, in, plan, controls, cached, bias, first, y + r * out, out);
  switch (batch - r) {
#define NMSPARSE_PREPACKED_TAIL(R) \
    case R: prepacked_rows<R, BLOCKS, PER_WINDOW, EIGHT, false>(x + r * in, in, plan, controls, cached, bias, first, y + r * out, out); break;
    NMSPARSE_PREPACKED_TAIL(1) NMSPARSE_PREPACKED_TAIL(2) NMSPARSE_PREPACKED_TAIL(3)
    NMSPARSE_PREPACKED_TAIL(4) NMSPARSE_PREPACKED_TAIL(5) NMSPARSE_PREPACKED_TAIL(6)
    NMSPARSE_PREPACKED_TAIL(7)
#undef NMSPARSE_PREPACKED_TAIL
    default: break;
  }
}

template <int PER_WINDOW, bool EIGHT>
BF16_TARGET void prepacked_panels(const bf16_t* x, int64_t batch, const PrepackedPlan& plan,
                                  const LanesControls& controls, const float* bias, float* y, int threads) {
  const int64_t blocks = (plan.out + 15) / 16;
  const int64_t panels = (blocks + LANE_BLOCKS - 1) / LANE_BLOCKS;
#pragma omp parallel num_threads(threads)
  {
    // without the buffer (out of memory) every block of rows expands its own controls
    uint32_t* cached = batch > LANE_ROWS
        ? reinterpret_cast<uint32_t*>(scratch(0, LANE_BLOCKS * plan.entries * 64)) : nullptr;
#pragma omp for schedule(static)
    for (int64_t panel = 0; panel < panels; ++panel) {
      const int64_t first = panel * LANE_BLOCKS * 16;
      if (blocks - panel * LANE_BLOCKS >= LANE_BLOCKS)
        prepacked_panel<LANE_BLOCKS, PER_WINDOW, EIGHT>(x, batch, plan, controls, cached, bias, first, y);
      else  // the last panel holds one block
        prepacked_panel<1, PER_WINDOW, EIGHT>(x, batch, plan, controls, cached, bias, first, y);
    }
  }
}

// The whole product: panels of LANE_BLOCKS blocks (the last may hold one) shared statically
// among the threads.
BF16_TARGET inline void prepacked_run(const bf16_t* x, const uint8_t* layout, const Shape& s,
                                      const float* bias, float* y, int threads) {
  const LanesControls controls(s);
  const PrepackedPlan plan{layout, lanes_block_bytes(s), lanes_entries(s), s.in, s.out};
  switch (lane_pairs_per_window(s) + (s.m == 8 ? 8 : 0)) {
    case 1: prepacked_panels<1, false>(x, s.batch, plan, controls, bias, y, threads); break;
    case 2: prepacked_panels<2, false>(x, s.batch, plan, controls, bias, y, threads); break;
    case 3: prepacked_panels<3, false>(x, s.batch, plan, controls, bias, y, threads); break;
    case 9: prepacked_panels<1, true>(x, s.batch, plan, controls, bias, y, threads); break;
    case 10: prepacked_panels<2, true>(x, s.batch, plan, controls, bias, y, threads); break;
    case 11: prepacked_panels<3, true>(x, s.batch, plan, controls, bias, y, threads); break;
    default: prepacked_panels<4, true>(x, s.batch, plan, controls, bias, y, threads); break;
  }
}

}  // namespace
