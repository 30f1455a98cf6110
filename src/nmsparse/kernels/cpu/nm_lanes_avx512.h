// The "lanes" kernel of the AVX-512 library (run by nm_packed_avx512.h): bf16 weights and
// bf16 x, many rows, M in {2, 4, 8} with N even or N = 1 and M <= 4.
//
// Sixteen outputs sit in the lanes of a zmm. Every pair of kept weights of an output (values
// 2p and 2p + 1 of its row) lies in one aligned 8-input window of x (16 bytes, one 128-bit
// part of a zmm), which holds both inputs the lane needs; vpshufb moves each lane's two
// inputs into place (its control word, built from the pair's position bits, differs per
// lane) and vdpbf16ps multiplies them with the 16 outputs' pairs of weights: one shuffle and
// one dot instruction per pair and row, where the dense product needs two dot instructions
// per pair. The shuffle runs on other ports than the dot, so, unlike the pairs kernel,
// nothing waits on a load per instruction (measured on Zen 4: 0.38 ns per shuffle + dot from
// registers, 0.27 ns per dot alone).
//
// vpshufb works within each 128-bit part, so each part needs its lanes' window. Rather than
// broadcast one window to all four parts (a shuffle per row and window), one 64-byte load
// of a row of x brings four consecutive windows, one per part, and the layout skews the
// lanes to match: at step t the lanes 4k .. 4k + 3 take their pairs of window t - 3 + k
// (LaneSkew, lane_rows).
//
// Per thread and panel (LANE_BLOCKS blocks of 16 outputs): the weights and controls are
// first laid out lane by lane in a buffer that stays in L2 (16 rows transposed in registers
// at a time, one control per pair from the position bits), then every block of up to
// LANE_ROWS rows runs over it with LANE_ROWS x LANE_BLOCKS accumulators in registers; the
// next panel's packed rows are prefetched meanwhile (LaneAhead). Padding (outputs past the
// last, pairs past the row's end, windows outside it) has weight 0 and control bytes 0x80,
// which make vpshufb write zeros, so no padded product can be 0 * inf.
#pragma once

#include "nm_avx512.h"

namespace {

constexpr int LANE_ROWS = 8;    // rows per pass over a panel (accumulators in registers)
constexpr int LANE_BLOCKS = 2;  // blocks of 16 outputs per panel
constexpr uint32_t LANE_EMPTY = 0x80808080u;

inline bool lanes_ok(const Shape& s) {
  return power_of_two(s.m) && s.m <= 8 && s.m >= 2 && (s.n % 2 == 0 || (s.n == 1 && s.m <= 4));
}

// Kept values per 8-input window (M in {2, 4, 8}), and pairs per window: values 2q and
// 2q + 1 of a window form its pair slot q; an odd count leaves the last slot one value, whose
// partner (the prepared layout's only) is a zero weight.
inline int lane_values_per_window(const Shape& s) { return 8 * s.n / s.m; }
inline int lane_pairs_per_window(const Shape& s) { return (lane_values_per_window(s) + 1) / 2; }

// The control word of a lane whose pair sits at window positions a and b: bytes 2a, 2a + 1,
// 2b, 2b + 1 of the window (x[a] in the low half of the lane, x[b] in the high half).
inline uint32_t lane_control(int a, int b) {
  return (uint32_t)(2 * a) | (uint32_t)(2 * a + 1) << 8 | (uint32_t)(2 * b) << 16 |
         (uint32_t)(2 * b + 1) << 24;
}

// Window positions of pair slot q (0 .. pairs per window - 1) before the in-group positions
// are added: value v of the window lies in group v / N (N even: both in group 2q / N; N = 1:
// groups 2q and 2q + 1; 3:4: a pair may span two groups). A slot's missing second value
// takes the first's place (its weight is zero).
inline void lane_offsets(const Shape& s, int q, int& first, int& second) {
  first = 2 * q / s.n * s.m;
  second = 2 * q + 1 < lane_values_per_window(s) ? (2 * q + 1) / s.n * s.m : first;
}

// The pair's field of 2w position bits -> its control (w = index width: 1, 2 or 4 bits).
inline uint32_t lane_field_control(const Shape& s, int q, uint32_t field) {
  int first, second;
  lane_offsets(s, q, first, second);
  const uint32_t mask = (uint32_t)s.m - 1;  // a corrupt field stays inside the window
  return lane_control(first + (int)(field & mask), second + (int)((field >> s.w) & mask));
}

// r[l] holds 16 words of row l; afterwards r[j] holds word j of the 16 rows.
inline void lane_transpose(__m512i (&r)[16]) {
  __m512i a[16], b[16], c[16];
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
    b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j) {
      c[8 * i + j] = _mm512_shuffle_i32x4(b[8 * i + j], b[8 * i + 4 + j], 0x88);
      c[8 * i + 4 + j] = _mm512_shuffle_i32x4(b[8 * i + j], b[8 * i + 4 + j], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(c[j], c[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_i32x4(c[j], c[j + 8], 0xdd);
  }
}

// The next panel's packed rows (two contiguous ranges: its values and its position bits),
// prefetched into L2 a few lines at a time while this panel is laid out and computed, so that
// memory stays busy throughout and the next layout reads from cache instead of waiting on
// memory row by row.
struct LaneAhead {
  const char* from[2] = {nullptr, nullptr};
  int64_t lines[2] = {0, 0};
  int64_t done = 0, per_step = 0;

  ALWAYS_INLINE void step() {
    for (int64_t i = 0; i < per_step; ++i, ++done) {
      const int part = done < lines[0] ? 0 : 1;
      const int64_t line = part ? done - lines[0] : done;
      if (part && line >= lines[1]) return;
      _mm_prefetch(from[part] + line * 64, _MM_HINT_T1);
    }
  }
};

// Writes one half (weights: 0, controls: 16) of a block's entries from the lane vectors of its
// pairs, pushed in pair order: entry (step t, slot q) takes its quarter k from the pair of
// slot q in window t - 3 + k, so it is a blend of the last four pushed for its slot (the
// "fill" vector before the first window and after the last).
template <int PER_WINDOW>
struct LaneSkew {
  uint32_t* dst;
  int half;
  __m512i fill;
  int64_t step = 0;
  __m512i prev[PER_WINDOW][3];

  BF16_TARGET LaneSkew(uint32_t* dst_, int half_, __m512i fill_) : dst(dst_), half(half_), fill(fill_) {
    for (int q = 0; q < PER_WINDOW; ++q) prev[q][0] = prev[q][1] = prev[q][2] = fill;
  }
  // the pairs of one window
  BF16_TARGET ALWAYS_INLINE void push(const __m512i* v) {
    for (int q = 0; q < PER_WINDOW; ++q) {
      __m512i e = _mm512_mask_blend_epi32(0x00F0, prev[q][0], prev[q][1]);
      e = _mm512_mask_blend_epi32(0x0F00, e, prev[q][2]);
      e = _mm512_mask_blend_epi32(0xF000, e, v[q]);
      _mm512_store_si512(dst + (step * PER_WINDOW + q) * 32 + half, e);
      prev[q][0] = prev[q][1];
      prev[q][1] = prev[q][2];
      prev[q][2] = v[q];
    }
    ++step;
  }
  BF16_TARGET void finish() {  // the 3 steps after the last window
    __m512i v[PER_WINDOW];
    for (int q = 0; q < PER_WINDOW; ++q) v[q] = fill;
    for (int i = 0; i < 3; ++i) push(v);
  }
};

// Per pair slot, the controls of a field's low 4 bits (a field of 2 bits repeats in them): what
// lane_layout maps fields through for M <= 4.
inline void lane_tables(const Shape& s, __m512i* tables) {
  const uint32_t field_mask = (1u << (2 * s.w)) - 1;
  for (int q = 0; q < lane_pairs_per_window(s); ++q) {
    uint32_t low[16];
    for (uint32_t f = 0; f < 16; ++f) low[f] = lane_field_control(s, q, f & field_mask);
    tables[q] = _mm512_loadu_si512(low);
  }
}

// Lay out outputs [o0, o0 + 16 * blocks) (those < s.out) lane by lane: per block, entries
// (steps x pairs per window; steps: the windows + 3) of 16 weight words then 16 control
// words, block b's from buf + b * entries * 32, the lanes 4k .. 4k + 3 of a pair 3 - k steps
// after its window (see LaneSkew and lane_rows).
// tables: lane_tables (M <= 4).
template <int PER_WINDOW>
BF16_TARGET void lane_layout(const bf16_t* values, const uint8_t* indices, const Shape& s,
                             int64_t o0, int blocks, int64_t entries, const __m512i* tables,
                             uint32_t* buf, LaneAhead& ahead) {
  const int64_t pairs = entries - 3 * PER_WINDOW;  // the windows' pairs
  const int64_t fields = (s.slots + 1) / 2;  // pairs with a value (the last may have one)
  const int field_bits = 2 * s.w;
  const __m512i empty = _mm512_set1_epi32((int)LANE_EMPTY);
  for (int b = 0; b < blocks; ++b) {
    const int64_t first = o0 + 16 * b;
    const int valid = first >= s.out ? 0 : s.out - first >= 16 ? 16 : (int)(s.out - first);
    const __mmask16 lanes = (__mmask16)((1u << valid) - 1);
    uint32_t* dst = buf + b * entries * 32;
    // weights: 16 pairs of each of the 16 rows (zero past the row), transposed in registers
    LaneSkew<PER_WINDOW> weights(dst, 0, _mm512_setzero_si512());
    const bf16_t* base = values + (valid ? first : 0) * s.slots;
    for (int64_t p0 = 0; p0 < pairs; p0 += 16) {
      const int64_t words = s.slots - 2 * p0;
      const __mmask32 part = words >= 32 ? ~(__mmask32)0 : words > 0 ? (__mmask32)((1u << words) - 1) : 0;
      __m512i r[16];
      for (int l = 0; l < 16; ++l)
        r[l] = l < valid ? _mm512_maskz_loadu_epi16(part, base + l * s.slots + 2 * p0) : _mm512_setzero_si512();
      lane_transpose(r);
      const int count = pairs - p0 >= 16 ? 16 : (int)(pairs - p0);  // a multiple of PER_WINDOW
      for (int j = 0; j < count; j += PER_WINDOW) weights.push(r + j);
      ahead.step();
    }
    weights.finish();
    // controls: 64 index bytes of each of the 16 rows, transposed in registers into 16
    // vectors of 4 bytes per row; each pair's field shifted down and mapped to its control
    LaneSkew<PER_WINDOW> controls(dst, 16, empty);
    const uint8_t* bits = indices + (valid ? first : 0) * s.index_bytes;
    const int per_word = 32 / field_bits;  // a multiple of PER_WINDOW
    for (int64_t byte0 = 0, p = 0; p < pairs; byte0 += 64) {
      const int64_t count = s.index_bytes - byte0;
      const __mmask64 part = count >= 64 ? ~(__mmask64)0 : count > 0 ? (((__mmask64)1 << count) - 1) : 0;
      __m512i r[16];
      for (int l = 0; l < 16; ++l)
        r[l] = l < valid ? _mm512_maskz_loadu_epi8(part, bits + l * s.index_bytes + byte0) : _mm512_setzero_si512();
      lane_transpose(r);
      for (int word = 0; word < 16 && p < pairs; ++word)
        for (int j = 0; j < per_word && p < pairs; j += PER_WINDOW, p += PER_WINDOW) {
          __m512i c[PER_WINDOW];
          for (int q = 0; q < PER_WINDOW; ++q) {
            const __m512i field = _mm512_srli_epi32(r[word], (j + q) * field_bits);
            __m512i control;
            if (s.m == 8) {  // (a, b) as 16-bit halves, each times 0x0202 plus 0x0100
              const __m512i ab = _mm512_or_si512(
                  _mm512_and_si512(field, _mm512_set1_epi32(7)),
                  _mm512_and_si512(_mm512_slli_epi32(field, 12), _mm512_set1_epi32(7 << 16)));
              control = _mm512_add_epi32(_mm512_mullo_epi16(ab, _mm512_set1_epi16(0x0202)),
                                         _mm512_set1_epi32(0x01000100));
            } else {  // the low 4 bits index the slot's table
              control = _mm512_permutexvar_epi32(field, tables[q]);
            }
            c[q] = p + q < fields ? _mm512_mask_mov_epi32(empty, lanes, control) : empty;
          }
          controls.push(c);
        }
    }
    controls.finish();
  }
}

// One step: every pair slot of every block meets the R rows' x (xw: quarter k of row r's
// vector holds window t - 3 + k).
template <int R, int BLOCKS, int PER_WINDOW>
BF16_TARGET ALWAYS_INLINE void lane_step(__m512 (&acc)[R][BLOCKS], const __m512i (&xw)[R],
                                         const uint32_t* at, int64_t entries) {
  for (int q = 0; q < PER_WINDOW; ++q)
    for (int b = 0; b < BLOCKS; ++b) {
      const uint32_t* pair = at + (b * entries + q) * 32;
      const __m512i w = _mm512_load_si512(pair);
      const __m512i c = _mm512_load_si512(pair + 16);
      for (int r = 0; r < R; ++r)
        acc[r][b] = _mm512_dpbf16_ps(acc[r][b], (__m512bh)_mm512_shuffle_epi8(xw[r], c), (__m512bh)w);
    }
}

// The R rows' inputs of step t where it reaches outside the row (of `in` inputs): masked
// loads, zeros outside.
template <int R>
BF16_TARGET ALWAYS_INLINE void lane_edge_inputs(__m512i (&xw)[R], const bf16_t* x, int64_t ldx,
                                                int64_t in, int64_t t) {
  const int64_t start = (t - 3) * 8;
  const int64_t lo = start < 0 ? -start : 0, hi = in - start < 32 ? in - start : 32;
  const __mmask32 inside = hi > lo ? (__mmask32)((((uint64_t)1 << hi) - 1) & ~(((uint64_t)1 << lo) - 1)) : 0;
  // integer arithmetic: the address may lie before x, but masked-off words are not read
  const bf16_t* from = reinterpret_cast<const bf16_t*>(reinterpret_cast<uintptr_t>(x) + start * 2);
  for (int r = 0; r < R; ++r) xw[r] = _mm512_maskz_loadu_epi16(inside, from + r * ldx);
}

// Where the steps wholly inside a row of `in` inputs end (of `steps`): step t loads the 32
// inputs from (t - 3) * 8; steps 0-2 start before the row.
inline int64_t lane_middle_end(int64_t in, int64_t steps) {
  const int64_t inner_end = in >= 32 ? (in - 32) / 8 + 4 : 3;
  return inner_end < steps ? inner_end : steps;
}

// y[r][o0 + 16 b + lane] = acc[r][b] + bias for the outputs below `out` (y: fp32, row stride
// ldy).
template <int R, int BLOCKS>
BF16_TARGET ALWAYS_INLINE void lane_store(const __m512 (&acc)[R][BLOCKS], const float* bias,
                                          int64_t o0, int64_t out, float* y, int64_t ldy) {
  for (int b = 0; b < BLOCKS; ++b) {
    const int64_t first = o0 + 16 * b;
    if (first >= out) break;
    const __mmask16 lanes = out - first >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (out - first)) - 1);
    const __m512 add = bias ? _mm512_maskz_loadu_ps(lanes, bias + first) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r)
      _mm512_mask_storeu_ps(y + r * ldy + first, lanes, _mm512_add_ps(acc[r][b], add));
  }
}

// A step that reaches outside the row.
template <int R, int BLOCKS, int PER_WINDOW>
BF16_TARGET ALWAYS_INLINE void lane_edge(__m512 (&acc)[R][BLOCKS], const bf16_t* x, int64_t ldx,
                                         int64_t in, int64_t t, const uint32_t* buf, int64_t entries) {
  __m512i xw[R];
  lane_edge_inputs<R>(xw, x, ldx, in, t);
  lane_step<R, BLOCKS, PER_WINDOW>(acc, xw, buf + t * PER_WINDOW * 32, entries);
}

// R rows (x row stride ldx) times the panel's BLOCKS blocks. Step t reads the 32 inputs from
// (t - 3) * 8 of each row in one load: its four windows serve the four quarters of the lanes,
// whose pairs the layout placed accordingly (no broadcast, which costs a shuffle per row and
// window). Steps that reach outside the row load masked. y: fp32, row stride ldy, column o0.
template <int R, int BLOCKS, int PER_WINDOW>
BF16_TARGET void lane_rows(const bf16_t* x, int64_t ldx, const uint32_t* buf, int64_t entries,
                           int64_t in, const float* bias, int64_t o0, int64_t out, float* y,
                           int64_t ldy, LaneAhead& ahead) {
  __m512 acc[R][BLOCKS];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < BLOCKS; ++b) acc[r][b] = _mm512_setzero_ps();
  const int64_t steps = entries / PER_WINDOW, middle_end = lane_middle_end(in, steps);
  int64_t t = 0;
  for (; t < 3 && t < steps; ++t) lane_edge<R, BLOCKS, PER_WINDOW>(acc, x, ldx, in, t, buf, entries);
  for (; t < middle_end; ++t) {
    __m512i xw[R];
    for (int r = 0; r < R; ++r) xw[r] = _mm512_loadu_si512(x + r * ldx + (t - 3) * 8);
    lane_step<R, BLOCKS, PER_WINDOW>(acc, xw, buf + t * PER_WINDOW * 32, entries);
    ahead.step();
  }
  for (; t < steps; ++t) lane_edge<R, BLOCKS, PER_WINDOW>(acc, x, ldx, in, t, buf, entries);
  lane_store<R, BLOCKS>(acc, bias, o0, out, y, ldy);
}

template <int PER_WINDOW>
BF16_TARGET void lane_panel(const bf16_t* x, int64_t rows, const uint32_t* buf, int64_t entries,
                            const Shape& s, const float* bias, int64_t o0, float* y,
                            LaneAhead& ahead) {
  int64_t r = 0;
  for (; r + LANE_ROWS <= rows; r += LANE_ROWS)
    lane_rows<LANE_ROWS, LANE_BLOCKS, PER_WINDOW>(x + r * s.in, s.in, buf, entries, s.in, bias, o0, s.out, y + r * s.out, s.out, ahead);
  switch (rows - r) {
#define NMSPARSE_LANE_TAIL(R) \
    case R: lane_rows<R, LANE_BLOCKS, PER_WINDOW>(x + r * s.in, s.in, buf, entries, s.in, bias, o0, s.out, y + r * s.out, s.out, ahead); break;
    NMSPARSE_LANE_TAIL(1) NMSPARSE_LANE_TAIL(2) NMSPARSE_LANE_TAIL(3) NMSPARSE_LANE_TAIL(4)
    NMSPARSE_LANE_TAIL(5) NMSPARSE_LANE_TAIL(6) NMSPARSE_LANE_TAIL(7)
#undef NMSPARSE_LANE_TAIL
    default: break;
  }
}

// The whole product: panels of 16 * LANE_BLOCKS outputs shared statically among the threads.
// Returns 0, or 2 when a buffer cannot be allocated.
BF16_TARGET inline int lanes_run(const bf16_t* x, const bf16_t* values, const uint8_t* indices,
                                 const Shape& s, const float* bias, float* y, int threads) {
  const int per_window = lane_pairs_per_window(s);
  const int64_t pairs = (s.in + 7) / 8 * per_window, entries = pairs + 3 * per_window;
  const int64_t panel_outputs = 16 * LANE_BLOCKS;
  const int64_t panels = (s.out + panel_outputs - 1) / panel_outputs;
  __m512i tables[2];
  lane_tables(s, tables);
  // the next panel's prefetch: one share per step of the layout (16 pairs of a block) and of
  // the rows' passes
  const int64_t ticks = LANE_BLOCKS * ((pairs + 15) / 16) +
                        (s.batch + LANE_ROWS - 1) / LANE_ROWS * (entries / per_window);
  int failed = 0;
#pragma omp parallel num_threads(threads)
  {
    uint32_t* buf = reinterpret_cast<uint32_t*>(scratch(0, LANE_BLOCKS * entries * 32 * 4));
    if (!buf) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(static)
    for (int64_t panel = 0; panel < panels; ++panel) {
      if (!buf) continue;
      const int64_t o0 = panel * panel_outputs;
      LaneAhead ahead;
      const int64_t next = o0 + panel_outputs, next_rows = s.out - next < panel_outputs ? s.out - next : panel_outputs;
      if (next_rows > 0) {
        ahead.from[0] = reinterpret_cast<const char*>(values + next * s.slots);
        ahead.lines[0] = (next_rows * s.slots * 2 + 63) / 64;
        ahead.from[1] = reinterpret_cast<const char*>(indices + next * s.index_bytes);
        ahead.lines[1] = (next_rows * s.index_bytes + 63) / 64;
        ahead.per_step = (ahead.lines[0] + ahead.lines[1] + ticks - 1) / ticks;
      }
      if (per_window == 1) {
        lane_layout<1>(values, indices, s, o0, LANE_BLOCKS, entries, tables, buf, ahead);
        lane_panel<1>(x, s.batch, buf, entries, s, bias, o0, y, ahead);
      } else {
        lane_layout<2>(values, indices, s, o0, LANE_BLOCKS, entries, tables, buf, ahead);
        lane_panel<2>(x, s.batch, buf, entries, s, bias, o0, y, ahead);
      }
    }
  }
  return failed ? 2 : 0;
}

}  // namespace
