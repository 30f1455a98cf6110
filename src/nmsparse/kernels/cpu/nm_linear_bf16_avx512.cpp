// The packed format's product with bf16 values (nm_packed_avx512.h's run), in its own unit so
// that _build.py compiles it beside the library's other units.
#include "nm_packed_avx512.h"

int nmsparse_run_packed_bf16(const void* x, const uint16_t* values, const uint8_t* indices,
                             int64_t batch, int64_t in, int64_t out, int64_t slots,
                             int64_t index_bytes, int n, int m, const float* bias, float* y,
                             int threads, int kernel, bool bf16_dot, bool vbmi) {
  const Shape s{batch, in, out, slots, index_bytes, n, m, index_width(m)};
  return run(x, values, indices, s, bias, y, threads, kernel, bf16_dot, vbmi);
}
