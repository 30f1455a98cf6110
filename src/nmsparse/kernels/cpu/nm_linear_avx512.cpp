// N:M sparse Linear on the CPU with AVX-512 (F/BW/VL/DQ; bf16 kernels also AVX512_BF16 and
// AVX512_VBMI2, enabled per function by a target attribute and run only where the CPU has
// them): y = x @ W.T + bias with W packed in the nmsparse.packing format. Only the packed
// bytes are read; nothing is expanded into memory.
//
// Built and loaded by nmsparse/kernels/cpu/_build.py; called through ctypes by
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
// slowest thread to be scheduled).
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

namespace {

typedef uint16_t bf16_t;

inline float scalar_f32(float v) { return v; }
inline float scalar_f32(bf16_t v) {
  uint32_t bits = (uint32_t)v << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

struct Shape {
  int64_t batch, in, out, slots, index_bytes;
  int n, m, w;
};

// Positions inside each group of the 8 / w values an index byte holds, turned into dense
// bits: lut[b] has bit (k / n) * m + position_k for each value k of the byte (values of one
// group when a byte holds fewer than n values). A chunk of 64 dense inputs (m divides 64) is
// covered by bytes_per_chunk bytes; byte i's bits go to (i * per_byte / n) * m.
struct Masks {
  uint64_t lut[256];
  int bytes_per_chunk;
  int shift[64];

  Masks(int n, int m, int w) {
    const int per_byte = 8 / w;
    for (int b = 0; b < 256; ++b) {
      uint64_t bits = 0;
      for (int k = 0; k < per_byte; ++k) {
        // & (m - 1): a corrupt field (>= m) must not add a bit, or more values would be read
        const int position = (b >> (k * w)) & ((1 << w) - 1) & (m - 1);
        const int group = per_byte >= n ? k / n : 0;
        bits |= 1ull << ((group * m + position) & 63);
      }
      lut[b] = bits;
    }
    bytes_per_chunk = 64 / m * n * w / 8;
    for (int i = 0; i < bytes_per_chunk && i < 64; ++i) shift[i] = i * per_byte / n * m;
  }
  // Dense bits of the chunk whose index bytes start at `bits` (count bytes available).
  inline uint64_t chunk(const uint8_t* bits, int count) const {
    uint64_t mask = 0;
    for (int i = 0; i < count; ++i) mask |= lut[bits[i]] << shift[i];
    return mask;
  }
};

inline bool power_of_two(int m) { return (m & (m - 1)) == 0; }

// ---------------------------------------------------------------- dot kernels (few rows)

// fp32 weights expanded by a 16-bit mask; bf16 weights widened to fp32 first.
inline __m512 expand16(__mmask16 mask, const float* v) {
  return _mm512_maskz_expandloadu_ps(mask, v);
}
inline __m512 expand16(__mmask16 mask, const bf16_t* v) {
  const int count = __builtin_popcount(mask);
  const __m256i raw = _mm256_maskz_loadu_epi16((__mmask16)((1u << count) - 1), v);
  const __m512 wide = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  return _mm512_maskz_expand_ps(mask, wide);
}

// R rows of x (fp32, row stride ldx) times P output rows starting at o.
template <typename T, int P, int R>
void dot_f32(const float* x, int64_t ldx, const T* values, const uint8_t* indices,
             const Shape& s, const Masks& masks, const float* bias, float* y, int64_t ldy,
             int64_t o) {
  __m512 acc[P][R];
  const T* v[P];
  const uint8_t* bits[P];
  for (int p = 0; p < P; ++p) {
    v[p] = values + (o + p) * s.slots;
    bits[p] = indices + (o + p) * s.index_bytes;
    for (int r = 0; r < R; ++r) acc[p][r] = _mm512_setzero_ps();
  }
  int64_t byte = 0;
  for (int64_t k0 = 0; k0 < s.in; k0 += 64, byte += masks.bytes_per_chunk) {
    const bool whole = s.in - k0 >= 64;
    const uint64_t valid = whole ? ~0ull : (1ull << (s.in - k0)) - 1;
    const int count = whole ? masks.bytes_per_chunk : (int)(s.index_bytes - byte);
    uint64_t mask[P];
    for (int p = 0; p < P; ++p) {
      mask[p] = masks.chunk(bits[p] + byte, count) & valid;
      _mm_prefetch(reinterpret_cast<const char*>(v[p]) + 1024, _MM_HINT_T0);
    }
    for (int q = 0; q < 4; ++q) {
      const __mmask16 lanes = (__mmask16)(valid >> (16 * q));
      if (!lanes) break;
      __m512 xr[R];
      for (int r = 0; r < R; ++r) xr[r] = _mm512_maskz_loadu_ps(lanes, x + r * ldx + k0 + 16 * q);
      for (int p = 0; p < P; ++p) {
        const __mmask16 part = (__mmask16)(mask[p] >> (16 * q));
        const __m512 w = expand16(part, v[p]);
        v[p] += __builtin_popcount(part);
        for (int r = 0; r < R; ++r) acc[p][r] = _mm512_fmadd_ps(w, xr[r], acc[p][r]);
      }
    }
  }
  for (int p = 0; p < P; ++p)
    for (int r = 0; r < R; ++r)
      y[r * ldy + o + p] = _mm512_reduce_add_ps(acc[p][r]) + (bias ? bias[o + p] : 0.0f);
}

#define BF16_TARGET __attribute__((target("avx512bf16,avx512vbmi2")))

// bf16 weights and bf16 x: 32 dense inputs per vdpbf16ps (pairs of products summed in fp32).
template <int P, int R>
BF16_TARGET void dot_bf16(const bf16_t* x, int64_t ldx, const bf16_t* values,
                          const uint8_t* indices, const Shape& s, const Masks& masks,
                          const float* bias, float* y, int64_t ldy, int64_t o) {
  __m512 acc[P][R];
  const bf16_t* v[P];
  const uint8_t* bits[P];
  for (int p = 0; p < P; ++p) {
    v[p] = values + (o + p) * s.slots;
    bits[p] = indices + (o + p) * s.index_bytes;
    for (int r = 0; r < R; ++r) acc[p][r] = _mm512_setzero_ps();
  }
  int64_t byte = 0;
  for (int64_t k0 = 0; k0 < s.in; k0 += 64, byte += masks.bytes_per_chunk) {
    const bool whole = s.in - k0 >= 64;
    const uint64_t valid = whole ? ~0ull : (1ull << (s.in - k0)) - 1;
    const int count = whole ? masks.bytes_per_chunk : (int)(s.index_bytes - byte);
    uint64_t mask[P];
    for (int p = 0; p < P; ++p) {
      mask[p] = masks.chunk(bits[p] + byte, count) & valid;
      _mm_prefetch(reinterpret_cast<const char*>(v[p]) + 1024, _MM_HINT_T0);
    }
    for (int h = 0; h < 2; ++h) {
      const __mmask32 lanes = (__mmask32)(valid >> (32 * h));
      if (!lanes) break;
      __m512i xr[R];
      for (int r = 0; r < R; ++r) xr[r] = _mm512_maskz_loadu_epi16(lanes, x + r * ldx + k0 + 32 * h);
      for (int p = 0; p < P; ++p) {
        const __mmask32 part = (__mmask32)(mask[p] >> (32 * h));
        const __m512i w = _mm512_maskz_expandloadu_epi16(part, v[p]);
        v[p] += __builtin_popcount(part);
        for (int r = 0; r < R; ++r)
          acc[p][r] = _mm512_dpbf16_ps(acc[p][r], (__m512bh)w, (__m512bh)xr[r]);
      }
    }
  }
  for (int p = 0; p < P; ++p)
    for (int r = 0; r < R; ++r)
      y[r * ldy + o + p] = _mm512_reduce_add_ps(acc[p][r]) + (bias ? bias[o + p] : 0.0f);
}

// Output rows [begin, end) for R rows of x: blocks of P, then single rows.
template <typename X, typename T, int R>
void dot_rows(const X* x, int64_t ldx, const T* values, const uint8_t* indices, const Shape& s,
              const Masks& masks, const float* bias, float* y, int64_t ldy, int64_t begin,
              int64_t end, bool bf16_dot);

template <int P, int R, typename T>
inline void dot_one(const void* x, int64_t ldx, const T* values, const uint8_t* indices,
                    const Shape& s, const Masks& masks, const float* bias, float* y,
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
               const Shape& s, const Masks& masks, const float* bias, float* y, int64_t ldy,
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
             const Shape& s, const Masks& masks, const float* bias, float* y, int64_t ldy,
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

// Rows of zeros after a block of xt: a position field can hold up to 15 whatever m is, so even
// a corrupt index never reads outside the buffer.
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
  int64_t k = 0;
  for (; k + 16 <= count; k += 16) {  // j + k is a multiple of 16
    uint64_t word = 0;
    memcpy(&word, bits + (j + k) * W / 8, 2 * W);
    const __m512i both = _mm512_mask_blend_epi32(high, _mm512_set1_epi32((int)(uint32_t)word),
                                                 _mm512_set1_epi32((int)(word >> 32)));
    const __m512i pos = _mm512_and_si512(_mm512_srlv_epi32(both, shifts), field);
    const int base = (int)((j + k) / n * m - k_first);
    const __m512i at = _mm512_add_epi32(_mm512_add_epi32(pos, in_chunk), _mm512_set1_epi32(base));
    _mm512_storeu_si512(offsets + k, _mm512_mullo_epi32(at, lanes_v));
  }
  for (; k < count; ++k) {
    const int64_t bit = (j + k) * W;
    const int64_t pos = (bits[bit >> 3] >> (bit & 7)) & ((1 << W) - 1);
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

// This thread's share [begin, end) of the output rows, in multiples of 16.
inline void share(int64_t out, int64_t& begin, int64_t& end) {
  const int64_t threads = omp_get_num_threads(), me = omp_get_thread_num();
  const int64_t units = (out + 15) / 16;
  begin = units * me / threads * 16;
  end = units * (me + 1) / threads * 16;
  if (end > out) end = out;
  if (begin > out) begin = out;
}

// kernel: 1 = dot, 2 = table.
template <typename T>
int run(const void* x, const T* values, const uint8_t* indices, const Shape& s,
        const float* bias, float* y, int threads, int kernel, bool bf16_dot) {
  if (kernel == 1 && !(power_of_two(s.m) && 64 % s.m == 0)) return 1;
  const Masks masks(s.n, s.m, s.w);
  int failed = 0;
  if (kernel == 1) {
#pragma omp parallel num_threads(threads)
    {
      int64_t begin, end;
      share(s.out, begin, end);
      const int64_t elem = bf16_dot ? 2 : 4;
      for (int64_t first = 0; first < s.batch; first += DOT_MAX_ROWS) {
        const int64_t rows = s.batch - first < DOT_MAX_ROWS ? s.batch - first : DOT_MAX_ROWS;
        const char* xr = static_cast<const char*>(x) + first * s.in * elem;
        dot_any<T>((int)rows, xr, s.in, values, indices, s, masks, bias, y + first * s.out,
                   s.out, begin, end, bf16_dot);
      }
    }
    return 0;
  }
  const int W = s.w;
#pragma omp parallel num_threads(threads)
  {
    int64_t begin, end;
    share(s.out, begin, end);
    const int64_t kb = block_inputs(s.m, 16);  // the largest block (fewest lanes)
    float* xt = static_cast<float*>(aligned_alloc(64, (size_t)((kb + PAD_ROWS) * TABLE_ROWS * 4 + 63) / 64 * 64));
    float* yt = static_cast<float*>(aligned_alloc(64, (size_t)((end - begin) * TABLE_ROWS * 4 + 64)));
    int32_t* offsets = static_cast<int32_t*>(aligned_alloc(64, (size_t)(kb * 4 + 64)));
    if (!xt || !yt || !offsets) {
#pragma omp atomic write
      failed = 1;
    } else if (begin < end) {
      const float* xf = static_cast<const float*>(x);
      for (int64_t first = 0; first < s.batch; first += TABLE_ROWS) {
        const int64_t rows = s.batch - first < TABLE_ROWS ? s.batch - first : TABLE_ROWS;
        const float* xr = xf + first * s.in;
        float* yr = y + first * s.out;
        if (W == 1) table_any<T, 1>(xr, s.in, rows, values, indices, s, bias, yr, s.out, begin, end, xt, yt, offsets);
        else if (W == 2) table_any<T, 2>(xr, s.in, rows, values, indices, s, bias, yr, s.out, begin, end, xt, yt, offsets);
        else table_any<T, 4>(xr, s.in, rows, values, indices, s, bias, yr, s.out, begin, end, xt, yt, offsets);
      }
    }
    free(xt);
    free(yt);
    free(offsets);
  }
  return failed ? 2 : 0;
}

}  // namespace

extern "C" {

// Bumped when a signature changes; the loader checks it.
int nmsparse_cpu_abi(void) { return 2; }

// y (batch, out_features) fp32 = x (batch, in_features) @ W.T (+ bias fp32). x: bf16 when
// x_bf16 (only with bf16 values and the bf16 dot kernel: options bit 2), else fp32. values:
// (out_features, slots) fp32 (bf16 = 0) or bf16; indices (out_features, index_bytes) uint8.
// All contiguous. options: bits 0-1 the kernel (1 dot: M a power of two, meant for few rows;
// 2 table: any M, meant for many rows), bit 2 "the CPU has AVX512_BF16 and AVX512_VBMI2: bf16
// x meets bf16 weights in vdpbf16ps" (the dot kernel only). Returns 0 on success, 1 for an
// unsupported pattern or kernel, 2 when out of memory, 3 for a bad x dtype.
int nmsparse_nm_linear(const void* x, int x_bf16, int64_t batch, int64_t in_features,
                       const void* values, int bf16, const uint8_t* indices,
                       int64_t out_features, int64_t slots, int64_t index_bytes, int n, int m,
                       const float* bias, float* y, int threads, int options) {
  if (n < 1 || 8 % n || n >= m || m > 16) return 1;
  const int w = m <= 2 ? 1 : m <= 4 ? 2 : 4;
  const Shape s{batch, in_features, out_features, slots, index_bytes, n, m, w};
  const int kernel = options & 3;
  const bool bf16_dot = (options & 4) != 0;
  if (kernel != 1 && kernel != 2) return 1;
  if (x_bf16 && !(bf16 && bf16_dot && kernel == 1)) return 3;
  if (bf16)
    return run(x, static_cast<const bf16_t*>(values), indices, s, bias, y, threads, kernel,
               x_bf16 != 0);
  return run(x, static_cast<const float*>(values), indices, s, bias, y, threads, kernel, false);
}

}  // extern "C"
