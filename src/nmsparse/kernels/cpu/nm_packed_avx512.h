// The packed format's kernels by number (run: dot, table, pairs, lanes), for
// nm_linear_avx512.cpp (fp32 values) and nm_linear_bf16_avx512.cpp (bf16 values).
#pragma once

#include "nm_lanes_avx512.h"

// Defined in nm_linear_bf16_avx512.cpp: run() for bf16 values, in a unit of its own so that
// it compiles beside the others (it is most of the library's compile time). The shape's
// fields as in Shape.
__attribute__((visibility("hidden"))) int nmsparse_run_packed_bf16(
    const void* x, const uint16_t* values, const uint8_t* indices, int64_t batch, int64_t in,
    int64_t out, int64_t slots, int64_t index_bytes, int n, int m, const float* bias, float* y,
    int threads, int kernel, bool bf16_dot, bool vbmi);

namespace {

// kernel: 1 = dot, 2 = table, 3 = pair table (bf16), 4 = lanes (bf16).
template <typename T>
int run(const void* x, const T* values, const uint8_t* indices, const Shape& s,
        const float* bias, float* y, int threads, int kernel, bool bf16_dot, bool vbmi) {
  if (kernel == 1 && !(power_of_two(s.m) && 64 % s.m == 0)) return 1;
  int failed = 0;
  if (kernel == 1) {
    const PatternMasks& tables = pattern_masks(s.n, s.m);
    // vpermi2b needs AVX512_VBMI, which every CPU with the bf16 kernels has (see the probe)
    const FastMasks* fast = vbmi ? &tables.fast : nullptr;
    const int64_t stride = mask_row_bytes(s.in);
#pragma omp parallel num_threads(threads)
    {
      int64_t begin, end;
      share(s.out, begin, end);
      uint8_t* buffer = static_cast<uint8_t*>(aligned_alloc(64, (size_t)(4 * stride)));
      if (!buffer) {
#pragma omp atomic write
        failed = 1;
      } else {
        const MaskRows masks{&tables.slow, fast, buffer, stride};
        const int64_t elem = bf16_dot ? 2 : 4;
        for (int64_t first = 0; first < s.batch; first += DOT_MAX_ROWS) {
          const int64_t rows = s.batch - first < DOT_MAX_ROWS ? s.batch - first : DOT_MAX_ROWS;
          const char* xr = static_cast<const char*>(x) + first * s.in * elem;
          dot_any<T>((int)rows, xr, s.in, values, indices, s, masks, bias, y + first * s.out,
                     s.out, begin, end, bf16_dot);
        }
      }
      free(buffer);
    }
    return failed ? 2 : 0;
  }
  const int W = s.w;
  if (kernel == 4) {
    if (sizeof(T) != 2 || !lanes_ok(s)) return 1;
    return lanes_run(static_cast<const bf16_t*>(x), reinterpret_cast<const bf16_t*>(values),
                     indices, s, bias, y, threads);
  }
  if (kernel == 3) {
    if (sizeof(T) != 2 || !pairs_ok(s)) return 1;
    const int64_t unit_inputs = s.n == 1 ? 2 * s.m : s.m;
    const int64_t k_padded = (s.in + unit_inputs - 1) / unit_inputs * unit_inputs;
    bf16_t* xt = reinterpret_cast<bf16_t*>(scratch(1, k_padded * PAIR_ROWS * 2));
    if (!xt) return 2;
    const bf16_t* xb = static_cast<const bf16_t*>(x);
    const bf16_t* vb = reinterpret_cast<const bf16_t*>(values);
#pragma omp parallel num_threads(threads)
    {
      int64_t begin, end;
      share(s.out, begin, end);
      char* table = scratch(0, pair_table_bytes() + PAIR_PANEL * PAIR_ROWS * 4);
      float* yt = table ? reinterpret_cast<float*>(table + pair_table_bytes()) : nullptr;
      if (!table) {
#pragma omp atomic write
        failed = 1;
      }
#pragma omp barrier
      int stop;
#pragma omp atomic read
      stop = failed;
      // every thread takes the same branch and meets the same barriers (xt is shared)
      if (!stop)
        for (int64_t first = 0; first < s.batch; first += PAIR_ROWS) {
          const int64_t rows = s.batch - first < PAIR_ROWS ? s.batch - first : PAIR_ROWS;
          const int64_t v = (rows + 15) / 16;
          const bf16_t* xr = xb + first * s.in;
          float* yr = y + first * s.out;
          if (first) {
#pragma omp barrier
          }
          pair_transpose(xr, s.in, rows, 16 * v, s.in, k_padded, xt);
#pragma omp barrier
          if (begin >= end) continue;
          if (v == 1) pair_any<1>(xr, s.in, rows, xt, vb, indices, s, bias, yr, s.out, begin, end, table, yt);
          else if (v == 2) pair_any<2>(xr, s.in, rows, xt, vb, indices, s, bias, yr, s.out, begin, end, table, yt);
          else if (v == 3) pair_any<3>(xr, s.in, rows, xt, vb, indices, s, bias, yr, s.out, begin, end, table, yt);
          else pair_any<4>(xr, s.in, rows, xt, vb, indices, s, bias, yr, s.out, begin, end, table, yt);
        }
    }
    return failed ? 2 : 0;
  }
#pragma omp parallel num_threads(threads)
  {
    int64_t begin, end;
    share(s.out, begin, end);
    const int64_t kb = block_inputs(s.m, 16);  // the largest block (fewest lanes)
    // this thread's kept scratch (no fresh pages per call), cut in three 64-byte-aligned parts
    const int64_t xt_bytes = ((kb + PAD_ROWS) * TABLE_ROWS * 4 + 63) / 64 * 64;
    const int64_t yt_bytes = ((end - begin) * TABLE_ROWS * 4 + 64 + 63) / 64 * 64;
    char* kept = scratch(0, xt_bytes + yt_bytes + kb * 4 + 64);
    float* xt = kept ? reinterpret_cast<float*>(kept) : nullptr;
    float* yt = kept ? reinterpret_cast<float*>(kept + xt_bytes) : nullptr;
    int32_t* offsets = kept ? reinterpret_cast<int32_t*>(kept + xt_bytes + yt_bytes) : nullptr;
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
        else if (W == 4) table_any<T, 4>(xr, s.in, rows, values, indices, s, bias, yr, s.out, begin, end, xt, yt, offsets);
        else table_any<T, 8>(xr, s.in, rows, values, indices, s, bias, yr, s.out, begin, end, xt, yt, offsets);
      }
    }
  }
  return failed ? 2 : 0;
}

}  // namespace
