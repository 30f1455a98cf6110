// The per-step mask pass of N:M sparse training on the CPU (nmsparse.engine.fused): one pass
// over a weight, in place, bit-identical to the eager torch ops.
//
// * refresh: mask = top N of |w| in every group of M (ties: the lower index wins; NaN never
//   beats or loses to anything, as the eager comparisons), masked = w where kept, else +0.0,
//   and "all finite";
// * fixed: the mask is given; masked = w where kept, w = masked, and "all finite" (of w before);
// * decay: grad += decay * w where pruned (the SR-STE term), one fused multiply-add per entry
//   as eager's add_(alpha=) (fp32 only).
//
// Built twice from this one source by nmsparse/kernels/cpu/_build.py: with AVX-512 F/BW/VL
// (16 lanes, mask registers) and with AVX2 (8 lanes, vector masks). The grouped axis has
// stride K in the flat weight (K = 1 for a Linear, the kernel area for a conv's "in" layout).
// The rank of an entry counts the members of its group that beat it: |w[i + d*K]| for the
// shifts 0 < |d| < M, from plain unaligned loads; a per-lane table says which shifts stay in
// the entry's group (the table repeats every lcm(M*K, lanes) entries). Vectors whose loads
// would leave the tensor (the first and last (M-1)*K entries) take the scalar loop.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <vector>

#include "nm_common.h"

namespace {

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
constexpr int LANES = 16;
#else
constexpr int LANES = 8;
#endif
// Largest table (shifts x vectors per period) the kernels build; beyond: status 1.
constexpr int64_t MAX_TABLE = 1 << 20;

inline float magnitude(float v) { return __builtin_fabsf(v); }  // clears the sign bit only

struct Geometry {
  int n, m;
  int64_t k, length;
  int64_t reach;   // (m - 1) * k: how far a group member can be
  int64_t period;  // vectors after which the in-group table repeats
  std::vector<int> shifts;
  std::vector<uint32_t> in_group;  // [period][shift]: bit `lane` set if that neighbour is in the group

  Geometry(int n_, int m_, int64_t k_, int64_t length_) : n(n_), m(m_), k(k_), length(length_) {
    reach = (int64_t)(m - 1) * k;
    int64_t group = (int64_t)m * k, a = group, b = LANES;
    while (b) {
      int64_t t = a % b;
      a = b;
      b = t;
    }
    period = group / a;  // lcm(group, LANES) / LANES
    for (int d = 1 - m; d < m; ++d)
      if (d) shifts.push_back(d);
  }
  bool build_table() {
    if (period * (int64_t)shifts.size() > MAX_TABLE) return false;
    in_group.assign(period * shifts.size(), 0);
    for (int64_t v = 0; v < period; ++v)
      for (size_t s = 0; s < shifts.size(); ++s)
        for (int lane = 0; lane < LANES; ++lane) {
          int64_t position = ((v * LANES + lane) / k) % m + shifts[s];
          if (position >= 0 && position < m) in_group[v * shifts.size() + s] |= 1u << lane;
        }
    return true;
  }
  bool interior(int64_t start) const {
    return start - reach >= 0 && start + LANES + reach <= length;
  }
};

// One entry, scalar: the same comparisons as the vector loop and the eager ops.
template <typename T>
inline bool keep_one(const T* w, const Geometry& g, int64_t i) {
  int position = (int)((i / g.k) % g.m);
  float a = magnitude(scalar_f32(w[i]));
  int rank = 0;
  for (int d = -position; d < g.m - position; ++d) {
    if (!d) continue;
    float b = magnitude(scalar_f32(w[i + d * g.k]));
    rank += d < 0 ? (b >= a) : (b > a);
  }
  return rank < g.n;
}

template <typename T>
inline bool finite_one(T v) {
  float a = magnitude(scalar_f32(v));
  return a <= 3.4028234663852886e38f;  // false for inf and NaN
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// ---- AVX-512: 16 lanes, mask registers --------------------------------------------------
inline __m512 load_f32(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load_f32(const bf16_t* p) {
  __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}
inline __m512 abs16(__m512 v) { return _mm512_abs_ps(v); }

inline void store_masked(float* out, const float* w, __mmask16 keep) {
  _mm512_storeu_ps(out, _mm512_maskz_mov_ps(keep, _mm512_loadu_ps(w)));
}
inline void store_masked(bf16_t* out, const bf16_t* w, __mmask16 keep) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_maskz_mov_epi16(keep, raw));
}
inline void store_mask(uint8_t* out, __mmask16 keep) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_maskz_set1_epi8(keep, 1));
}
inline __mmask16 load_mask(const uint8_t* p) {
  __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm_test_epi8_mask(bytes, bytes);
}

template <typename T>
inline bool refresh_vector(const T* w, uint8_t* mask, T* masked, const Geometry& g,
                           const uint32_t* table, int64_t e) {
  const __m512 a = abs16(load_f32(w + e));
  __m512i rank = _mm512_setzero_si512();
  const __m512i one = _mm512_set1_epi32(1);
  const int count = (int)g.shifts.size();
  for (int s = 0; s < count; ++s) {
    int d = g.shifts[s];
    __mmask16 lanes = (__mmask16)table[s];
    __m512 b = abs16(load_f32(w + e + d * g.k));
    __mmask16 beats = d < 0 ? _mm512_mask_cmp_ps_mask(lanes, b, a, _CMP_GE_OQ)
                            : _mm512_mask_cmp_ps_mask(lanes, b, a, _CMP_GT_OQ);
    rank = _mm512_mask_add_epi32(rank, beats, rank, one);
  }
  __mmask16 keep = _mm512_cmplt_epi32_mask(rank, _mm512_set1_epi32(g.n));
  store_mask(mask + e, keep);
  store_masked(masked + e, w + e, keep);
  return _mm512_cmp_ps_mask(a, _mm512_set1_ps(3.4028234663852886e38f), _CMP_NLE_UQ) == 0;
}

template <typename T>
inline bool fixed_vector(T* w, const uint8_t* mask, T* masked, int64_t e) {
  __mmask16 keep = load_mask(mask + e);
  __m512 a = abs16(load_f32(w + e));
  bool finite = _mm512_cmp_ps_mask(a, _mm512_set1_ps(3.4028234663852886e38f), _CMP_NLE_UQ) == 0;
  store_masked(masked + e, w + e, keep);
  store_masked(w + e, w + e, keep);
  return finite;
}

inline void decay_vector(float* grad, const float* w, const uint8_t* mask, __m512 decay,
                         int64_t e) {
  __mmask16 pruned = ~load_mask(mask + e);
  __m512 other = _mm512_maskz_mov_ps(pruned, _mm512_loadu_ps(w + e));
  _mm512_storeu_ps(grad + e, _mm512_fmadd_ps(other, decay, _mm512_loadu_ps(grad + e)));
}
typedef __m512 DecayVec;
inline DecayVec broadcast(float v) { return _mm512_set1_ps(v); }
#else
// ---- AVX2: 8 lanes, vector masks --------------------------------------------------------
inline __m256 load_f32(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load_f32(const bf16_t* p) {
  __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}
inline __m256 abs8(__m256 v) {
  return _mm256_castsi256_ps(
      _mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(0x7fffffff)));
}
// 8 bytes 0/1 <-> a vector of 8 int32 masks (all ones = kept).
inline __m256i load_mask(const uint8_t* p) {
  __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cmpgt_epi32(_mm256_cvtepu8_epi32(bytes), _mm256_setzero_si256());
}
inline void store_mask(uint8_t* out, __m256i keep) {
  __m256i ones = _mm256_and_si256(keep, _mm256_set1_epi32(1));
  __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(ones), _mm256_extracti128_si256(ones, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm_packus_epi16(words, words));
}
inline void store_masked(float* out, const float* w, __m256i keep) {
  _mm256_storeu_ps(out, _mm256_and_ps(_mm256_loadu_ps(w), _mm256_castsi256_ps(keep)));
}
inline void store_masked(bf16_t* out, const bf16_t* w, __m256i keep) {
  __m128i keep16 = _mm_packs_epi32(_mm256_castsi256_si128(keep), _mm256_extracti128_si256(keep, 1));
  __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_and_si128(raw, keep16));
}
inline bool all_finite(__m256 a) {
  __m256 ok = _mm256_cmp_ps(a, _mm256_set1_ps(3.4028234663852886e38f), _CMP_LE_OQ);
  return _mm256_movemask_ps(ok) == 0xff;
}

template <typename T>
inline bool refresh_vector(const T* w, uint8_t* mask, T* masked, const Geometry& g,
                           const uint32_t* table, int64_t e) {
  const __m256 a = abs8(load_f32(w + e));
  __m256i rank = _mm256_setzero_si256();
  const int count = (int)g.shifts.size();
  for (int s = 0; s < count; ++s) {
    int d = g.shifts[s];
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    __m256i lanes = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)table[s]), bit), bit);
    __m256 b = abs8(load_f32(w + e + d * g.k));
    __m256 beats = d < 0 ? _mm256_cmp_ps(b, a, _CMP_GE_OQ) : _mm256_cmp_ps(b, a, _CMP_GT_OQ);
    // a true compare is all ones (-1): subtracting it counts one
    rank = _mm256_sub_epi32(rank, _mm256_and_si256(_mm256_castps_si256(beats), lanes));
  }
  __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(g.n), rank);
  store_mask(mask + e, keep);
  store_masked(masked + e, w + e, keep);
  return all_finite(a);
}

template <typename T>
inline bool fixed_vector(T* w, const uint8_t* mask, T* masked, int64_t e) {
  __m256i keep = load_mask(mask + e);
  bool finite = all_finite(abs8(load_f32(w + e)));
  store_masked(masked + e, w + e, keep);
  store_masked(w + e, w + e, keep);
  return finite;
}

inline void decay_vector(float* grad, const float* w, const uint8_t* mask, __m256 decay,
                         int64_t e) {
  __m256 other = _mm256_andnot_ps(_mm256_castsi256_ps(load_mask(mask + e)), _mm256_loadu_ps(w + e));
  _mm256_storeu_ps(grad + e, _mm256_fmadd_ps(other, decay, _mm256_loadu_ps(grad + e)));
}
typedef __m256 DecayVec;
inline DecayVec broadcast(float v) { return _mm256_set1_ps(v); }
#endif

// Splits [0, vectors) among the threads; body(first, last) returns "all finite" of its part.
template <typename Body>
bool parallel(int64_t vectors, int threads, Body body) {
  int finite = 1;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(&& : finite)
  for (int t = 0; t < threads; ++t) {
    int64_t first = vectors * t / threads, last = vectors * (t + 1) / threads;
    finite = body(first, last) && finite;
  }
  return finite;
}

template <typename T>
int refresh(const T* w, uint8_t* mask, T* masked, int64_t length, int n, int m, int64_t k,
            int threads, uint8_t* finite) {
  Geometry g(n, m, k, length);
  if (!g.build_table()) return 1;
  int64_t vectors = (length + LANES - 1) / LANES;
  const size_t per_vector = g.shifts.size();
  *finite = parallel(vectors, threads, [&](int64_t first, int64_t last) {
    bool ok = true;
    for (int64_t v = first; v < last; ++v) {
      int64_t e = v * LANES;
      if (g.interior(e)) {
        ok &= refresh_vector(w, mask, masked, g, g.in_group.data() + (v % g.period) * per_vector,
                             e);
        continue;
      }
      for (int64_t i = e; i < e + LANES && i < length; ++i) {
        bool keep = keep_one(w, g, i);
        mask[i] = keep;
        T zero;
        memset(&zero, 0, sizeof zero);
        masked[i] = keep ? w[i] : zero;
        ok &= finite_one(w[i]);
      }
    }
    return ok;
  });
  return 0;
}

template <typename T>
int fixed(T* w, const uint8_t* mask, T* masked, int64_t length, int threads, uint8_t* finite) {
  int64_t vectors = length / LANES;
  bool ok = parallel(vectors, threads, [&](int64_t first, int64_t last) {
    bool part = true;
    for (int64_t v = first; v < last; ++v) part &= fixed_vector(w, mask, masked, v * LANES);
    return part;
  });
  for (int64_t i = vectors * LANES; i < length; ++i) {
    ok &= finite_one(w[i]);
    T zero;
    memset(&zero, 0, sizeof zero);
    masked[i] = mask[i] ? w[i] : zero;
    w[i] = masked[i];
  }
  *finite = ok;
  return 0;
}

}  // namespace

extern "C" {

int nmsparse_cpu_abi(void) { return NMSPARSE_CPU_ABI; }

int nmsparse_mask_lanes(void) { return LANES; }

// dtype: 0 float32, 1 bfloat16. Returns 0, or 1 for a geometry whose table is too large.
int nmsparse_mask_refresh(const void* w, int dtype, uint8_t* mask, void* masked, int64_t length,
                          int n, int m, int64_t k, int threads, uint8_t* finite) {
  if (dtype == 1)
    return refresh((const bf16_t*)w, mask, (bf16_t*)masked, length, n, m, k, threads, finite);
  return refresh((const float*)w, mask, (float*)masked, length, n, m, k, threads, finite);
}

int nmsparse_mask_fixed(void* w, int dtype, const uint8_t* mask, void* masked, int64_t length,
                        int threads, uint8_t* finite) {
  if (dtype == 1) return fixed((bf16_t*)w, mask, (bf16_t*)masked, length, threads, finite);
  return fixed((float*)w, mask, (float*)masked, length, threads, finite);
}

// float32 only: grad += decay * (w where the mask is 0), fused multiply-add per entry.
int nmsparse_mask_decay(float* grad, const float* w, const uint8_t* mask, float decay,
                        int64_t length, int threads) {
  int64_t vectors = length / LANES;
  DecayVec factor = broadcast(decay);
  parallel(vectors, threads, [&](int64_t first, int64_t last) {
    for (int64_t v = first; v < last; ++v) decay_vector(grad, w, mask, factor, v * LANES);
    return true;
  });
  for (int64_t i = vectors * LANES; i < length; ++i)
    grad[i] = __builtin_fmaf(mask[i] ? 0.0f : w[i], decay, grad[i]);
  return 0;
}

}  // extern "C"
