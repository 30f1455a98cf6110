// The AVX-512 library's AMX entry points (nm_amx_avx512.h): the product on tiles from the
// packed format or the prepared layout, and the self-check run in a child process.
#include "nm_amx_avx512.h"

namespace {

// The AMX kernel's two sources of dense rows: the packed format (M a power of two dividing
// 64, where the masks are built 64 bits at a time) and the prepared lanes layout.
struct PackedPanel {
  const bf16_t* values;
  const uint8_t* indices;
  const Shape& s;
  const Masks* slow;
  const FastMasks* fast;

  // scratch: mask_row_bytes(s.in) bytes
  void operator()(int64_t o, int64_t outputs, bf16_t* panel, int64_t ld, uint8_t* scratch) const {
    const MaskRows masks{slow, fast, scratch, mask_row_bytes(s.in)};
    for (int64_t r = 0; r < outputs; ++r) {
      const uint8_t* dense = masks.build(0, indices + (o + r) * s.index_bytes, s);
      expand_row_bf16(dense, values + (o + r) * s.slots, s.in, panel + r * ld);
    }
  }
};

struct LanesPanel {
  const uint8_t* layout;
  Shape s;  // the layout's shape (lanes_layout_shape)
  int64_t block_bytes, entries;

  BF16_TARGET void operator()(int64_t o, int64_t outputs, bf16_t* panel, int64_t ld, uint8_t*) const {
    lanes_dense_block(layout + o / 16 * block_bytes, s, entries, outputs, panel, ld);
  }
};

}  // namespace

extern "C" {

// AMX (nm_amx_avx512.h). nmsparse_amx_emulated: 1 when this library was built with
// NMSPARSE_AMX_EMULATE (tile operations in C++, for the tests), 0 for the real tiles, -1 when
// the compiler could not build AMX code (GCC < 11, Clang < 12: the AMX kernel cannot run).
int nmsparse_amx_emulated(void) { return NMSPARSE_AMX_BUILD; }

// Asks Linux for the AMX tile state (once per process is enough): 0 when granted, else 1.
int nmsparse_amx_request(void) { return amx_request(); }

// y (batch, out_features) fp32 = x (batch, in_features, bf16) @ W.T (+ bias fp32) on AMX
// tiles, W packed in bf16 with M a power of two dividing 64. Only on a CPU with AMX-BF16,
// AVX512_BF16 and VBMI after nmsparse_amx_request (the caller checks); the emulated build on
// any CPU with AVX512_BF16 and VBMI. Returns 0, 1 for an unsupported pattern, 2 when out of
// memory.
int nmsparse_amx_linear(const void* x, int64_t batch, int64_t in_features, const void* values,
                        const uint8_t* indices, int64_t out_features, int64_t slots,
                        int64_t index_bytes, int n, int m, const float* bias, float* y,
                        int threads) {
  if (n < 1 || n >= m || m > 64 || !power_of_two(m)) return 1;
  const Shape s{batch, in_features, out_features, slots, index_bytes, n, m, index_width(m)};
  const PatternMasks& tables = pattern_masks(n, m);
  const PackedPanel expand{static_cast<const bf16_t*>(values), indices, s, &tables.slow,
                           &tables.fast};
  return amx_run(static_cast<const bf16_t*>(x), batch, in_features, out_features, bias, y,
                 threads, expand, mask_row_bytes(in_features));
}

// The same with W in the lanes layout (nmsparse_lanes_pack). Returns 0, or 1 for a pattern
// the layout does not take, 2 when out of memory.
int nmsparse_amx_lanes_linear(const void* x, int64_t batch, int64_t in_features,
                              const uint8_t* layout, int64_t out_features, int n, int m,
                              const float* bias, float* y, int threads) {
  const Shape s{batch, in_features, out_features, 0, 0, n, m, index_width(m)};
  if (!lanes_pattern_ok(s)) return 1;
  const Shape view = lanes_layout_shape(s);
  const LanesPanel expand{layout, view, lanes_block_bytes(view), lanes_entries(view)};
  return amx_run(static_cast<const bf16_t*>(x), batch, in_features, out_features, bias, y,
                 threads, expand, 0);
}

// A check of nmsparse_amx_linear against a scalar product on a small 2:4 weight whose shape
// leaves every tile partial (37 rows of x, 72 inputs, 40 outputs), on `threads` threads: 0
// when it agrees, 1 when it does not, 2 when Linux refuses the tile state, 3 when memory runs
// out.
// Run in a child process before the kernel is used (a fault there does not end the caller).
int nmsparse_amx_selftest(int threads) {
  if (amx_request()) return 2;
  const int64_t batch = 37, in = 72, out = 40, n = 2, m = 4, slots = in / m * n;
  const int64_t index_bytes = (slots * 2 + 7) / 8;
  static bf16_t x[batch * in], values[out * slots];
  static uint8_t indices[out * index_bytes];
  static float dense[out * in], bias[out], y[batch * out];
  uint32_t state = 12345;
  auto next = [&state]() { state = state * 1103515245u + 12345u; return state >> 8; };
  // small integers and halves are exact in bf16, and so are their products and sums here
  auto value = [&next]() { return (float)((int)(next() % 17) - 8) * 0.5f; };
  auto to_bf16 = [](float f) { uint32_t b; memcpy(&b, &f, 4); return (bf16_t)(b >> 16); };
  for (int64_t i = 0; i < batch * in; ++i) x[i] = to_bf16(value());
  memset(indices, 0, sizeof indices);
  memset(dense, 0, sizeof dense);
  for (int64_t o = 0; o < out; ++o) {
    bias[o] = value();
    for (int64_t g = 0; g < in / m; ++g) {
      const int first = (int)(next() % 3), second = first + 1 + (int)(next() % (3 - first));
      const int at[2] = {first, second};
      for (int j = 0; j < 2; ++j) {
        const int64_t slot = g * n + j, bit = slot * 2;
        indices[o * index_bytes + bit / 8] |= (uint8_t)(at[j] << (bit % 8));
        const float v = value();
        values[o * slots + slot] = to_bf16(v);
        dense[o * in + g * m + at[j]] = v;
      }
    }
  }
  if (nmsparse_amx_linear(x, batch, in, values, indices, out, slots, index_bytes, n, m, bias, y,
                          threads))
    return 3;
  for (int64_t r = 0; r < batch; ++r)
    for (int64_t o = 0; o < out; ++o) {
      float want = bias[o];
      for (int64_t k = 0; k < in; ++k) want += scalar_f32(x[r * in + k]) * dense[o * in + k];
      if (y[r * out + o] != want) return 1;
    }
  return 0;
}

}  // extern "C"
