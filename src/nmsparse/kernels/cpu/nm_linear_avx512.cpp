// The AVX-512 library's entry points for the packed format (nm_avx512.h says what the
// kernels do and how the library's units divide): the product with fp32 values (bf16 values
// go to nm_linear_bf16_avx512.cpp), the expansion to dense rows, and the per-thread scratch
// every unit shares.
#include "nm_packed_avx512.h"

// A 2 MiB-aligned buffer of at least `bytes`, kept by the calling thread between calls (see
// scratch in nm_avx512.h). nullptr when out of memory.
namespace {
struct Scratch {
  char* data = nullptr;
  int64_t size = 0;
  ~Scratch() { free(data); }
};
}  // namespace

char* nmsparse_kept_scratch(int slot, int64_t bytes) {
  static thread_local Scratch kept[2];
  Scratch& s = kept[slot];
  if (s.size < bytes) {
    const int64_t huge = 2 << 20;
    free(s.data);
    s.size = (bytes + huge - 1) / huge * huge;
    s.data = static_cast<char*>(aligned_alloc(huge, (size_t)s.size));
    if (!s.data) s.size = 0;
  }
  return s.data;
}

extern "C" {

int nmsparse_cpu_abi(void) { return NMSPARSE_CPU_ABI; }

// y (batch, out_features) fp32 = x (batch, in_features) @ W.T (+ bias fp32). x: bf16 when
// x_bf16 (only with bf16 values and the bf16 dot kernel: options bit 3), else fp32. values:
// (out_features, slots) fp32 (bf16 = 0) or bf16; indices (out_features, index_bytes) uint8.
// All contiguous. options: bits 0-2 the kernel (1 dot: M a power of two, meant for few rows;
// 2 table: any M, meant for many rows; 3 pair table: bf16, M in {2, 4, 8} and N = 1 or even;
// 4 lanes: bf16, M in {2, 4, 8} and N even or N = 1 with M <= 4), bit 3 (OPTION_BF16) "the
// CPU has AVX512_BF16, AVX512_VBMI and AVX512_VBMI2": then bf16 x (x_bf16 = 1, required)
// meets bf16 weights in vdpbf16ps in the dot, pair and lanes kernels. Returns 0 on success, 1
// for an unsupported pattern or kernel, 2 when out of memory, 3 for a bad x dtype.
int nmsparse_nm_linear(const void* x, int x_bf16, int64_t batch, int64_t in_features,
                       const void* values, int bf16, const uint8_t* indices,
                       int64_t out_features, int64_t slots, int64_t index_bytes, int n, int m,
                       const float* bias, float* y, int threads, int options) {
  if (n < 1 || n >= m || m > MAX_M) return 1;
  if (8 % n && (options & 7) != 1) return 1;  // only the dot kernel takes any N
  const int w = index_width(m);
  const Shape s{batch, in_features, out_features, slots, index_bytes, n, m, w};
  const int kernel = options & 7;
  const bool bf16_dot = (options & OPTION_BF16) != 0;
  if (kernel < 1 || kernel > 4 || (kernel >= 3 && !(bf16 && bf16_dot))) return 1;
  if (x_bf16 != (bf16 && bf16_dot && kernel != 2)) return 3;
  if (bf16)
    return nmsparse_run_packed_bf16(x, static_cast<const bf16_t*>(values), indices, batch,
                                    in_features, out_features, slots, index_bytes, n, m, bias, y,
                                    threads, kernel, x_bf16 != 0, bf16_dot);
  return run(x, static_cast<const float*>(values), indices, s, bias, y, threads, kernel, false,
             bf16_dot);
}

// Dense rows [begin, end) of the packed weight, written to dst ((end - begin) x in, the
// values' dtype: bf16 when bf16): for the "dense" path, which multiplies tiles of the weight
// expanded just in time with the caller's dense GEMM. options bit 3 as above (VBMI for the
// masks). Returns 0, or 1 for an unsupported pattern.
int nmsparse_unpack(const void* values, int bf16, const uint8_t* indices, int64_t slots,
                    int64_t index_bytes, int n, int m, int64_t in, int64_t begin, int64_t end,
                    void* dst, int threads, int options) {
  if (n < 1 || n >= m || m > MAX_M) return 1;
  const int w = index_width(m);
  const Shape s{0, in, end, slots, index_bytes, n, m, w};
  const int64_t elem = bf16 ? 2 : 4;
  if (!(power_of_two(m) && 64 % m == 0)) {  // scalar
    for (int64_t o = begin; o < end; ++o) {
      char* row = static_cast<char*>(dst) + (o - begin) * in * elem;
      memset(row, 0, in * elem);
      const uint8_t* bits = indices + o * index_bytes;
      for (int64_t j = 0; j < slots; ++j) {
        const int64_t bit = j * w;
        const int64_t at = j / n * m + ((bits[bit >> 3] >> (bit & 7)) & ((1 << w) - 1));
        if (at < in)
          memcpy(row + at * elem, static_cast<const char*>(values) + (o * slots + j) * elem, elem);
      }
    }
    return 0;
  }
  const PatternMasks& tables = pattern_masks(n, m);
  const FastMasks* fast = (options & OPTION_BF16) ? &tables.fast : nullptr;
  const int64_t stride = mask_row_bytes(in);
  int failed = 0;
#pragma omp parallel num_threads(threads)
  {
  uint8_t* buffer = static_cast<uint8_t*>(aligned_alloc(64, (size_t)stride));
  if (!buffer) {
#pragma omp atomic write
    failed = 1;
  }
  const MaskRows masks{&tables.slow, fast, buffer, stride};
#pragma omp for schedule(static)
  for (int64_t o = begin; o < end; ++o) {
    if (!buffer) continue;
    const uint8_t* dense = masks.build(0, indices + o * index_bytes, s);
    if (bf16) {
      expand_row_bf16(dense, static_cast<const bf16_t*>(values) + o * slots, in,
                      static_cast<bf16_t*>(dst) + (o - begin) * in);
    } else {
      const float* v = static_cast<const float*>(values) + o * slots;
      float* row = static_cast<float*>(dst) + (o - begin) * in;
      for (int64_t k0 = 0; k0 < in; k0 += 16) {
        uint16_t mask;
        memcpy(&mask, dense + k0 / 8, 2);
        const __mmask16 lanes = in - k0 >= 16 ? 0xFFFF : (__mmask16)((1u << (in - k0)) - 1);
        mask &= lanes;
        const int count = __builtin_popcount(mask);
        const __m512 raw = _mm512_maskz_loadu_ps((__mmask16)((1u << count) - 1), v);
        _mm512_mask_storeu_ps(row + k0, lanes, _mm512_maskz_expand_ps(mask, raw));
        v += count;
      }
    }
  }
  free(buffer);
  }
  return failed ? 2 : 0;
}

}  // extern "C"
