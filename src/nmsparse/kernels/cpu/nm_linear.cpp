// N:M sparse Linear on the CPU (AVX2 + FMA, OpenMP): y = x @ W.T + bias with W packed in the
// nmsparse.packing format (per output row: the kept values, then the in-group positions of
// those values, w bits each, little-endian inside each byte). Only the packed bytes are read:
// positions are expanded to input offsets in registers.
//
// Built and loaded by nmsparse/kernels/cpu/_build.py (g++ -O3 -mavx2 -mfma -fopenmp); called
// through ctypes by nmsparse/kernels/cpu/__init__.py, which checks every argument first.
//
// Two inner loops, both accumulating in fp32:
// * one input row (decode): 8 values at a time, their 8 input offsets decoded with one
//   variable shift, x gathered at those offsets, one FMA;
// * 2..64 input rows: x is transposed once per call to xt (in, cols) so that the inputs one
//   weight value multiplies are contiguous; each value is broadcast and FMA'd into 1..8
//   registers of 8 rows. Batches above 64 rows are done 64 rows at a time.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "nm_common.h"

#include <utility>

namespace {

// How far ahead of use the weight values are prefetched (bytes).
constexpr int PREFETCH_BYTES = 1024;


inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16_t* p) {
  // bf16 is the top half of an fp32: widen and shift, exact.
  __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Decodes the input offsets of the values of one output row. W: bits per position.
template <int W>
struct Positions {
  const uint8_t* bits;  // the row's index bytes
  int n, m;
  __m256i shifts, field, in_chunk;

  Positions(const uint8_t* row_bits, int n_, int m_) : bits(row_bits), n(n_), m(m_) {
    shifts = _mm256_setr_epi32(0, W, 2 * W, 3 * W, 4 * W, 5 * W, 6 * W, 7 * W);
    field = _mm256_set1_epi32((1 << W) - 1);
    // Value k of a chunk of 8 (the chunk starts at a group boundary because n divides 8)
    // lies in group k / n of the chunk.
    in_chunk = _mm256_setr_epi32(0, 1 / n * m, 2 / n * m, 3 / n * m, 4 / n * m, 5 / n * m,
                                 6 / n * m, 7 / n * m);
  }
  // Offsets of values j .. j+7 (j a multiple of 8): 8 positions are exactly W bytes.
  inline __m256i chunk(int64_t j) const {
    uint32_t word = 0;
    memcpy(&word, bits + j * W / 8, W);
    __m256i pos = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)word), shifts), field);
    return _mm256_add_epi32(pos, _mm256_add_epi32(in_chunk, _mm256_set1_epi32((int)(j / n * m))));
  }
  inline int64_t one(int64_t j) const {
    int64_t bit = j * W;
    return j / n * m + ((bits[bit >> 3] >> (bit & 7)) & ((1 << W) - 1));
  }
};

template <typename T, int W>
void rows_one_input(const float* x, const T* values, const uint8_t* indices, int64_t slots,
                    int64_t index_bytes, int n, int m, const float* bias, float* y,
                    int64_t begin, int64_t end) {
  const int64_t whole = slots / 16 * 16;
  for (int64_t o = begin; o < end; ++o) {
    const T* v = values + o * slots;
    Positions<W> pos(indices + o * index_bytes, n, m);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j < whole; j += 16) {
      __m256 x0 = _mm256_i32gather_ps(x, pos.chunk(j), 4);
      __m256 x1 = _mm256_i32gather_ps(x, pos.chunk(j + 8), 4);
      acc0 = _mm256_fmadd_ps(load8(v + j), x0, acc0);
      acc1 = _mm256_fmadd_ps(load8(v + j + 8), x1, acc1);
    }
    float sum = hsum(_mm256_add_ps(acc0, acc1));
    for (; j < slots; ++j) sum += scalar_f32(v[j]) * x[pos.one(j)];
    y[o] = bias ? sum + bias[o] : sum;
  }
}

// One input row, 2:4 / 1:4 / 4:8 / 2:8: the 8 inputs that 8 consecutive values multiply are
// picked out of R = M / N registers of x by permutes (each keeps the lanes whose group the
// register holds) and merged by constant blends: no gather, and the decoded position fields
// are the permute controls as they are (a permute reads only the low 2 or 3 bits of a lane).
// * M = 8: register q is group q of the chunk; vpermps reads 3 bits = the position.
// * M = 4: vpermilps permutes inside each 128-bit half, one group per half, reading 2 bits.
//   For that, x is laid out per chunk of G = 8 / N groups as registers q = [group q |
//   group q + G/2] (see relaid_index), so lane k (group k / N) finds its group in its half.
template <int N, int M>
inline __m256 pick8(const float* xb, __m256i control) {
  constexpr int R = M / N;
  __m256 merged;
  if (M == 8) {
    merged = _mm256_permutevar8x32_ps(_mm256_loadu_ps(xb), control);
    for (int q = 1; q < R; ++q) {
      const __m256 part = _mm256_permutevar8x32_ps(_mm256_loadu_ps(xb + 8 * q), control);
      // lanes k with k / N == q
      merged = q == 1 ? _mm256_blend_ps(merged, part, R == 2 ? 0xF0 : 0x0C)
             : q == 2 ? _mm256_blend_ps(merged, part, 0x30)
                      : _mm256_blend_ps(merged, part, 0xC0);
    }
  } else {
    // register q fills lanes k with (k / N) % R == q in both halves
    merged = _mm256_permutevar_ps(_mm256_loadu_ps(xb), control);
    for (int q = 1; q < R; ++q) {
      const __m256 part = _mm256_permutevar_ps(_mm256_loadu_ps(xb + 8 * q), control);
      merged = R == 2 ? _mm256_blend_ps(merged, part, 0xCC)
             : q == 1 ? _mm256_blend_ps(merged, part, 0x22)
             : q == 2 ? _mm256_blend_ps(merged, part, 0x44)
                      : _mm256_blend_ps(merged, part, 0x88);
    }
  }
  return merged;
}

// Where input i goes in the layout pick8<N, 4> reads (M = 4 only; the inputs after the last
// whole chunk of 8 values keep their place).
inline int64_t relaid_index(int64_t i, int n, int64_t in_features) {
  const int64_t groups = 8 / n, span = 4 * groups;
  const int64_t block = i / span;
  if ((block + 1) * span > in_features) return i;
  const int64_t group = i % span / 4, half = group >= groups / 2;
  return block * span + (group - half * groups / 2) * 8 + half * 4 + i % 4;
}

// P output rows at once: P independent weight streams keep more memory requests in flight
// than one (a single stream left the loop waiting on memory at half dense's bandwidth).
template <typename T, int N, int M, int P>
inline void row_block_permute(const float* x, const T* values, const uint8_t* indices,
                              int64_t slots, int64_t index_bytes, const float* bias, float* y,
                              int64_t o) {
  constexpr int W = M <= 4 ? 2 : 4;
  static_assert(M / N == 2 || M / N == 4, "permute path needs M / N in {2, 4}");
  const __m256i shifts = _mm256_setr_epi32(0, W, 2 * W, 3 * W, 4 * W, 5 * W, 6 * W, 7 * W);
  const __m256i shifts_next = _mm256_add_epi32(shifts, _mm256_set1_epi32(8 * W));
  const int64_t whole16 = W == 2 ? slots / 16 * 16 : 0;
  const int64_t whole8 = slots / 8 * 8;
  const T* v[P];
  const uint8_t* bits[P];
  __m256 acc0[P], acc1[P];
  for (int p = 0; p < P; ++p) {
    v[p] = values + (o + p) * slots;
    bits[p] = indices + (o + p) * index_bytes;
    acc0[p] = _mm256_setzero_ps();
    acc1[p] = _mm256_setzero_ps();
  }
  int64_t j = 0;
  // 16 values per step when their positions fill one 32-bit word (W = 2).
  for (; j < whole16; j += 16) {
    const float* xa = x + j / N * M;
    const float* xb = x + (j + 8) / N * M;
    for (int p = 0; p < P; ++p) {
      _mm_prefetch(reinterpret_cast<const char*>(v[p] + j) + PREFETCH_BYTES, _MM_HINT_T0);
      int32_t word;
      memcpy(&word, bits[p] + j * W / 8, 4);
      const __m256i all = _mm256_set1_epi32(word);
      acc0[p] = _mm256_fmadd_ps(load8(v[p] + j),
                                pick8<N, M>(xa, _mm256_srlv_epi32(all, shifts)), acc0[p]);
      acc1[p] = _mm256_fmadd_ps(load8(v[p] + j + 8),
                                pick8<N, M>(xb, _mm256_srlv_epi32(all, shifts_next)), acc1[p]);
    }
  }
  for (; j < whole8; j += 8) {
    const float* xa = x + j / N * M;
    for (int p = 0; p < P; ++p) {
      _mm_prefetch(reinterpret_cast<const char*>(v[p] + j) + PREFETCH_BYTES, _MM_HINT_T0);
      int32_t word = 0;
      memcpy(&word, bits[p] + j * W / 8, W);
      acc0[p] = _mm256_fmadd_ps(
          load8(v[p] + j), pick8<N, M>(xa, _mm256_srlv_epi32(_mm256_set1_epi32(word), shifts)),
          acc0[p]);
    }
  }
  for (int p = 0; p < P; ++p) {
    float sum = hsum(_mm256_add_ps(acc0[p], acc1[p]));
    const Positions<W> pos(bits[p], N, M);
    for (int64_t k = j; k < slots; ++k) sum += scalar_f32(v[p][k]) * x[pos.one(k)];
    y[o + p] = bias ? sum + bias[o + p] : sum;
  }
}

template <typename T, int N, int M>
void rows_one_input_permute(const float* x, const T* values, const uint8_t* indices,
                            int64_t slots, int64_t index_bytes, const float* bias, float* y,
                            int64_t begin, int64_t end) {
  int64_t o = begin;
  for (; o + 4 <= end; o += 4)
    row_block_permute<T, N, M, 4>(x, values, indices, slots, index_bytes, bias, y, o);
  for (; o < end; ++o)
    row_block_permute<T, N, M, 1>(x, values, indices, slots, index_bytes, bias, y, o);
}

inline __m256 broadcast(const float* p) { return _mm256_broadcast_ss(p); }
inline __m256 broadcast(const bf16_t* p) { return _mm256_set1_ps(scalar_f32(*p)); }

// Output rows [begin, end) for `rows` (<= 8 * V) input rows held in xt (row stride ld, in
// floats; columns beyond `rows` are zero). C independent accumulator chains hide the FMA
// latency when V is small.
template <typename T, int W, int V>
void rows_many_inputs(const float* xt, int64_t ld, int64_t rows, const T* values,
                      const uint8_t* indices, int64_t slots, int64_t index_bytes, int n, int m,
                      const float* bias, float* y, int64_t y_stride, int64_t begin, int64_t end) {
  constexpr int C = V >= 4 ? 1 : 4 / V;
  constexpr int BLOCK = 256;
  alignas(32) int32_t offsets[BLOCK];
  for (int64_t o = begin; o < end; ++o) {
    const T* v = values + o * slots;
    Positions<W> pos(indices + o * index_bytes, n, m);
    __m256 acc[C][V];
    for (int c = 0; c < C; ++c)
      for (int t = 0; t < V; ++t) acc[c][t] = _mm256_setzero_ps();
    const __m256i ldv = _mm256_set1_epi32((int)ld);
    for (int64_t start = 0; start < slots; start += BLOCK) {
      const int64_t count = slots - start < BLOCK ? slots - start : BLOCK;
      int64_t k = 0;
      for (; k + 8 <= count; k += 8)  // start is a multiple of 8
        _mm256_store_si256(reinterpret_cast<__m256i*>(offsets + k),
                           _mm256_mullo_epi32(pos.chunk(start + k), ldv));
      for (; k < count; ++k) offsets[k] = (int32_t)(pos.one(start + k) * ld);
      const T* vb = v + start;
      int64_t j = 0;
      for (; j + C <= count; j += C) {
        for (int c = 0; c < C; ++c) {
          const __m256 w = broadcast(vb + j + c);
          const float* xr = xt + offsets[j + c];
          for (int t = 0; t < V; ++t)
            acc[c][t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xr + 8 * t), acc[c][t]);
        }
      }
      for (; j < count; ++j) {
        const __m256 w = broadcast(vb + j);
        const float* xr = xt + offsets[j];
        for (int t = 0; t < V; ++t)
          acc[0][t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xr + 8 * t), acc[0][t]);
      }
    }
    alignas(32) float lanes[8 * V];
    for (int t = 0; t < V; ++t) {
      __m256 s = acc[0][t];
      for (int c = 1; c < C; ++c) s = _mm256_add_ps(s, acc[c][t]);
      _mm256_store_ps(lanes + 8 * t, s);
    }
    const float b = bias ? bias[o] : 0.0f;
    for (int64_t r = 0; r < rows; ++r) y[r * y_stride + o] = lanes[r] + b;
  }
}

template <typename T, int W>
void run_tile(const float* xt, int64_t ld, int64_t rows, const T* values, const uint8_t* indices,
              int64_t slots, int64_t index_bytes, int n, int m, const float* bias, float* y,
              int64_t y_stride, int64_t begin, int64_t end) {
  if (rows <= 8)
    rows_many_inputs<T, W, 1>(xt, ld, rows, values, indices, slots, index_bytes, n, m, bias, y,
                              y_stride, begin, end);
  else if (rows <= 16)
    rows_many_inputs<T, W, 2>(xt, ld, rows, values, indices, slots, index_bytes, n, m, bias, y,
                              y_stride, begin, end);
  else if (rows <= 32)
    rows_many_inputs<T, W, 4>(xt, ld, rows, values, indices, slots, index_bytes, n, m, bias, y,
                              y_stride, begin, end);
  else
    rows_many_inputs<T, W, 8>(xt, ld, rows, values, indices, slots, index_bytes, n, m, bias, y,
                              y_stride, begin, end);
}

template <typename T, int W>
void one_input(const float* x, const T* values, const uint8_t* indices, int64_t slots,
               int64_t index_bytes, int n, int m, const float* bias, float* y, int64_t begin,
               int64_t end) {
  const int key = n * 100 + m;
  if (W == 2 && key == 204)
    rows_one_input_permute<T, 2, 4>(x, values, indices, slots, index_bytes, bias, y, begin, end);
  else if (W == 2 && key == 104)
    rows_one_input_permute<T, 1, 4>(x, values, indices, slots, index_bytes, bias, y, begin, end);
  else if (W == 4 && key == 408)
    rows_one_input_permute<T, 4, 8>(x, values, indices, slots, index_bytes, bias, y, begin, end);
  else if (W == 4 && key == 208)
    rows_one_input_permute<T, 2, 8>(x, values, indices, slots, index_bytes, bias, y, begin, end);
  else
    rows_one_input<T, W>(x, values, indices, slots, index_bytes, n, m, bias, y, begin, end);
}

constexpr int64_t TILE_ROWS = 64;

// Columns of xt: 64 per full tile, the last tile rounded up to 8, 16, 32 or 64.
int64_t xt_columns(int64_t batch) {
  const int64_t full = (batch - 1) / TILE_ROWS, last = batch - full * TILE_ROWS;
  int64_t width = 8;
  while (width < last) width *= 2;
  return full * TILE_ROWS + width;
}

// Rows of zeros after the inputs: a position field can hold up to 15 whatever m is, so even
// a corrupt index never reads outside the buffers.
constexpr int64_t PAD_ROWS = 16;

// Each thread fills its own copy of the inputs (x is small: copying it twice costs far less
// than a barrier, which on a machine shared with other jobs waits for the slowest thread to
// be scheduled), then takes its static share of the output rows: one barrier per call.
template <typename T, int W>
int nm_linear(const float* x, int64_t batch, int64_t in_features, const T* values,
              const uint8_t* indices, int64_t out_features, int64_t slots, int64_t index_bytes,
              int n, int m, const float* bias, float* y, int threads) {
  const int64_t ld = batch == 1 ? 1 : xt_columns(batch);
  const size_t bytes = (size_t)((in_features + PAD_ROWS) * ld * 4 + 63) / 64 * 64;
  const bool relaid = batch == 1 && m == 4 && (n == 1 || n == 2);  // see pick8
  int failed = 0;
#pragma omp parallel num_threads(threads)
  {
    float* xt = static_cast<float*>(aligned_alloc(64, bytes));
    if (!xt) {
#pragma omp atomic write
      failed = 1;
    } else {
      for (int64_t i = 0; i < in_features + PAD_ROWS; ++i) {
        float* dst = xt + i * ld;
        int64_t r = 0;
        if (i < in_features && !relaid)
          for (; r < batch; ++r) dst[r] = x[r * in_features + i];
        for (; r < ld; ++r) dst[r] = 0.0f;
      }
      if (relaid)
        for (int64_t i = 0; i < in_features; ++i) xt[relaid_index(i, n, in_features)] = x[i];
    }
    // Every thread meets every work-sharing loop (OpenMP requires it), even without a buffer.
    if (batch == 1) {
#pragma omp for schedule(static) nowait
      for (int64_t o = 0; o < out_features; o += 16) {
        const int64_t end = o + 16 < out_features ? o + 16 : out_features;
        if (xt) one_input<T, W>(xt, values, indices, slots, index_bytes, n, m, bias, y, o, end);
      }
    } else {
      for (int64_t first = 0; first < batch; first += TILE_ROWS) {
        const int64_t rows = batch - first < TILE_ROWS ? batch - first : TILE_ROWS;
#pragma omp for schedule(static) nowait
        for (int64_t o = 0; o < out_features; o += 16) {
          const int64_t end = o + 16 < out_features ? o + 16 : out_features;
          if (xt)
            run_tile<T, W>(xt + first, ld, rows, values, indices, slots, index_bytes, n, m,
                           bias, y + first * out_features, out_features, o, end);
        }
      }
    }
    free(xt);
  }
  return failed ? 2 : 0;
}

template <typename T>
int dispatch(const float* x, int64_t batch, int64_t in_features, const T* values,
             const uint8_t* indices, int64_t out_features, int64_t slots, int64_t index_bytes,
             int n, int m, const float* bias, float* y, int threads) {
  switch (m <= 2 ? 1 : m <= 4 ? 2 : m <= 16 ? 4 : 0) {
    case 1: return nm_linear<T, 1>(x, batch, in_features, values, indices, out_features, slots, index_bytes, n, m, bias, y, threads);
    case 2: return nm_linear<T, 2>(x, batch, in_features, values, indices, out_features, slots, index_bytes, n, m, bias, y, threads);
    case 4: return nm_linear<T, 4>(x, batch, in_features, values, indices, out_features, slots, index_bytes, n, m, bias, y, threads);
  }
  return 1;
}

}  // namespace

extern "C" {

int nmsparse_cpu_abi(void) { return NMSPARSE_CPU_ABI; }

// What this CPU (and its operating system) runs, for the dispatcher in __init__.py: bit 0
// AVX2 + FMA, bit 1 AVX-512 F/BW/VL/DQ, bit 2 AVX512_BF16 + AVX512_VBMI + AVX512_VBMI2 (the bf16 kernels),
// bit 3 AMX-BF16 tiles (reported only: no kernel uses them yet). No AVX instruction here.
int nmsparse_cpu_features(void) {
  __builtin_cpu_init();
  int bits = 0;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) bits |= 1;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    bits |= 2;
  if ((bits & 2) && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vbmi2") &&
      __builtin_cpu_supports("avx512vbmi"))
    bits |= 4;
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
  if (__builtin_cpu_supports("amx-bf16")) bits |= 8;
#endif
  return bits;
}

// y (batch, out_features) fp32 = x (batch, in_features) fp32 @ W.T (+ bias fp32). values:
// (out_features, slots) fp32 (bf16 = 0) or bf16 (bf16 = 1); indices (out_features,
// index_bytes) uint8. All contiguous. n must divide 8 and m be at most 16. x_bf16 must be 0
// and options is unused (the same signature as the AVX-512 library's). Returns 0 on success,
// 1 for an unsupported pattern, 2 when out of memory, 3 for a bf16 x.
int nmsparse_nm_linear(const void* x, int x_bf16, int64_t batch, int64_t in_features,
                       const void* values, int bf16, const uint8_t* indices,
                       int64_t out_features, int64_t slots, int64_t index_bytes, int n, int m,
                       const float* bias, float* y, int threads, int options) {
  (void)options;
  if (n < 1 || 8 % n || n >= m || m > 16) return 1;
  if (x_bf16) return 3;
  const float* xf = static_cast<const float*>(x);
  if (bf16)
    return dispatch(xf, batch, in_features, static_cast<const bf16_t*>(values), indices,
                    out_features, slots, index_bytes, n, m, bias, y, threads);
  return dispatch(xf, batch, in_features, static_cast<const float*>(values), indices,
                  out_features, slots, index_bytes, n, m, bias, y, threads);
}

}  // extern "C"
