// What caps the CPU pairs kernel (src/nmsparse/kernels/cpu/nm_linear_avx512.cpp, pair_slice):
// the same inner loop on synthetic data, one thread, timed per vdpbf16ps. Built and run by
// benchmarks/pairs_loop/run.py; prints one "name ns" line per case.
//   registers  vdpbf16ps alone, 8 independent chains, operands in registers
//   table V L  the pairs loop: 8 pairs per 64-bit word of 4-bit codes (2:4), a broadcast
//              weight word and V zmm of the matching table entry (16 V rows) per pair, over
//              a table of L units (16 entries of 64 V bytes each; 6 of them touched, a < b)
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <chrono>
#include <vector>

#define T __attribute__((target("avx512bf16,avx512f,avx512bw,bmi2")))

T static float registers(long n) {
  __m512 acc[8];
  for (int c = 0; c < 8; ++c) acc[c] = _mm512_setzero_ps();
  const __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80), b = a;
  for (long i = 0; i < n; ++i)
    for (int c = 0; c < 8; ++c) {
      acc[c] = _mm512_dpbf16_ps(acc[c], a, b);
      __asm__ volatile("" ::"v"(acc[c]));  // keep the chains; the operands stay in registers
    }
  __m512 s = acc[0];
  for (int c = 1; c < 8; ++c) s = _mm512_add_ps(s, acc[c]);
  return _mm512_reduce_add_ps(s);
}

template <int V>
T static float table_loop(const char* table, const uint32_t* w, const uint64_t* bits, long count,
                          long units, int reps) {
  constexpr int K = V >= 8 ? 1 : 8 / V;
  constexpr long ENTRY = 64 * V, UNIT = 16 * ENTRY;
  __m512 acc[K][V];
  for (int c = 0; c < K; ++c)
    for (int t = 0; t < V; ++t) acc[c][t] = _mm512_setzero_ps();
  for (int r = 0; r < reps; ++r)
    for (long j = 0; j + 8 <= count; j += 8) {
      const uint64_t b = bits[j / 8];
      const char* unit = table + (j % units) * UNIT;
#pragma GCC unroll 8
      for (int c = 0; c < 8; ++c) {
        const char* x = unit + c * UNIT + ((b >> (4 * c)) & 15) * ENTRY;
        __asm__("" : "+r"(x));
        const __m512bh wv = (__m512bh)_mm512_set1_epi32((int)w[j + c]);
        for (int t = 0; t < V; ++t)
          acc[c % K][t] = _mm512_dpbf16_ps(acc[c % K][t], wv, (__m512bh)_mm512_load_si512(x + 64 * t));
      }
    }
  __m512 s = _mm512_setzero_ps();
  for (int c = 0; c < K; ++c)
    for (int t = 0; t < V; ++t) s = _mm512_add_ps(s, acc[c][t]);
  return _mm512_reduce_add_ps(s);
}

template <int V>
static void table_case(long units) {
  const long bytes = (units + 8) * 16 * 64 * V;
  char* table = static_cast<char*>(aligned_alloc(64, bytes));
  for (long i = 0; i < bytes; i += 4) *reinterpret_cast<uint32_t*>(table + i) = 0x3f803f80;
  const long count = 4096;
  std::vector<uint32_t> w(count, 0x3f803f80);
  std::vector<uint64_t> bits(count / 8);
  const int touched[6] = {4, 8, 9, 12, 13, 14};  // a + 4 b with a < b
  srand(1);
  for (auto& word : bits) {
    word = 0;
    for (int c = 0; c < 8; ++c) word |= (uint64_t)touched[rand() % 6] << (4 * c);
  }
  const int reps = 40000 / V;
  table_loop<V>(table, w.data(), bits.data(), count, units, 10);
  const auto start = std::chrono::steady_clock::now();
  const float sink = table_loop<V>(table, w.data(), bits.data(), count, units, reps);
  const double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start).count();
  printf("table V=%d units=%ld touched_KiB=%ld %.3f %g\n", V, units, units * 6 * 64 * V / 1024,
         ns / ((double)count * reps * V), sink * 0);
  free(table);
}

int main() {
  const long n = 50000000;
  const auto start = std::chrono::steady_clock::now();
  const float sink = registers(n);
  const double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start).count();
  printf("registers %.3f %g\n", ns / (n * 8.0), sink * 0);
  for (long units : {8, 16, 64, 256}) table_case<1>(units);
  for (long units : {4, 16, 64, 256}) table_case<4>(units);
  return 0;
}
