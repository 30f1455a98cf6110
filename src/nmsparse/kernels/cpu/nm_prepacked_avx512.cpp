// The AVX-512 library's entry points for the prepared (lanes) layout: its size, the packing
// to and from the packed format, its dense rows and its product (nm_prepacked_avx512.h).
#include "nm_prepacked_avx512.h"

extern "C" {

// The lanes layout of a bf16 packed weight (nm_prepacked_avx512.h): its size in bytes, or -1
// for a pattern the layout does not take.
int64_t nmsparse_lanes_bytes(int64_t out_features, int64_t in_features, int n, int m) {
  const Shape s{0, in_features, out_features, 0, 0, n, m, index_width(m)};
  if (!lanes_pattern_ok(s)) return -1;
  return lanes_bytes(lanes_layout_shape(s));
}

// 0 if the packed weight can be laid out (M = 16: every group's low-half positions come
// first), 4 if not, 1 for a pattern the layout does not take.
int nmsparse_lanes_check(const uint8_t* indices, int64_t out_features, int64_t in_features,
                         int64_t slots, int64_t index_bytes, int n, int m) {
  const Shape s{0, in_features, out_features, slots, index_bytes, n, m, index_width(m)};
  if (!lanes_pattern_ok(s)) return 1;
  return m == 16 && !lanes16_order_ok(indices, s) ? 4 : 0;
}

// Packed bf16 (values, indices) -> the lanes layout (dst: nmsparse_lanes_bytes), and back.
// Return 0, 1 for a pattern the layout does not take (or, unpacking, a corrupt M = 16
// layout), 2 when out of memory, 4 as nmsparse_lanes_check.
int nmsparse_lanes_pack(const void* values, const uint8_t* indices, int64_t out_features,
                        int64_t in_features, int64_t slots, int64_t index_bytes, int n, int m,
                        uint8_t* dst) {
  const Shape s{0, in_features, out_features, slots, index_bytes, n, m, index_width(m)};
  if (!lanes_pattern_ok(s)) return 1;
  const bf16_t* v = static_cast<const bf16_t*>(values);
  if (m != 16) {
    lanes_pack(v, indices, s, dst);
    return 0;
  }
  if (!lanes16_order_ok(indices, s)) return 4;
  const Shape view = lanes16_view(s);
  const Lanes16Buffers buffers(view);
  if (!buffers.ok()) return 2;
  lanes16_split(v, indices, s, view, buffers.values, buffers.indices);
  lanes_pack(buffers.values, buffers.indices, view, dst);
  return 0;
}

int nmsparse_lanes_unpack(const uint8_t* src, int64_t out_features, int64_t in_features,
                          int64_t slots, int64_t index_bytes, int n, int m, void* values,
                          uint8_t* indices) {
  const Shape s{0, in_features, out_features, slots, index_bytes, n, m, index_width(m)};
  if (!lanes_pattern_ok(s)) return 1;
  bf16_t* v = static_cast<bf16_t*>(values);
  if (m != 16) {
    lanes_unpack(src, s, v, indices);
    return 0;
  }
  const Shape view = lanes16_view(s);
  const Lanes16Buffers buffers(view);
  if (!buffers.ok()) return 2;
  lanes_unpack(src, view, buffers.values, buffers.indices);
  return lanes16_merge(buffers.values, buffers.indices, s, view, v, indices) ? 0 : 1;
}

// Dense bf16 rows [begin, end) of a lanes layout into dst ((end - begin) x in_features);
// begin a multiple of 16. Only on a CPU with AVX512_BF16 and VBMI (the caller checks).
// Returns 0, or 1 for a pattern the layout does not take or a misaligned begin.
int nmsparse_lanes_dense(const uint8_t* layout, int64_t out_features, int64_t in_features, int n,
                         int m, int64_t begin, int64_t end, void* dst, int threads) {
  const Shape s{0, in_features, out_features, 0, 0, n, m, index_width(m)};
  if (!lanes_pattern_ok(s) || begin % 16 || begin < 0 || end > out_features || begin > end) return 1;
  lanes_dense(layout, lanes_layout_shape(s), begin, end, static_cast<uint16_t*>(dst), threads);
  return 0;
}

// y (batch, out_features) fp32 = x (batch, in_features, bf16) @ W.T (+ bias fp32), W in the
// lanes layout. Only on a CPU with AVX512_BF16 and VBMI (the caller checks). Returns 0, or 1
// for a pattern the layout does not take.
int nmsparse_lanes_linear(const void* x, int64_t batch, int64_t in_features,
                          const uint8_t* layout, int64_t out_features, int n, int m,
                          const float* bias, float* y, int threads) {
  const Shape s{batch, in_features, out_features, 0, 0, n, m, index_width(m)};
  if (!lanes_pattern_ok(s)) return 1;
  prepacked_run(static_cast<const bf16_t*>(x), layout, lanes_layout_shape(s), bias, y, threads);
  return 0;
}

}  // extern "C"
