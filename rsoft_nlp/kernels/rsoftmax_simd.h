// Vectorised rows of the fused r-softmax kernel, for float32 compute (float, bfloat16 and half inputs).
//
// The row code is written once against `Ops`, a handful of lane-wise operations implemented with AVX-512 (16 lanes)
// or AVX2 (8 lanes), whichever the build targets. It computes what the portable rows in rsoftmax_cpu.cpp compute,
// with fused multiply-adds in exp and a multiplication by 1 / S for the normalisation, so results may differ from
// them in the last bit.
//
// Rows whose length is not a multiple of the lane count, and rows of bfloat16 or half, are staged through a float
// buffer padded with -inf keys. A -inf key has exp 0, so it acts as a masked key: weight 0, gradient 0, and it is
// not counted toward r.
//
// The quickselect steps shared with the portable rows (rsoft_select) come first, outside the vector code.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512VL__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
#define RSOFT_SIMD_WIDTH 16
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define RSOFT_SIMD_WIDTH 8
#endif

namespace rsoft_select {

// One quickselect step after a three-way partition of the active range cur[0, m) around `pivot` into `less`
// (values below it) and `more` (values above it). Either moves the range to the side that holds rank k and returns
// false, or, when the k-th value equals the pivot, writes the k-th and (k + 1)-th values and returns true. `above`
// is the smallest value known to lie above the range (the (k + 1)-th when k ends up last).
template <typename acc_t>
bool narrow(acc_t pivot, acc_t* less, int64_t n_less, acc_t* more, int64_t n_more, acc_t** cur, int64_t* m,
            int64_t* k, acc_t* above, acc_t* lo_out, acc_t* hi_out) {
  const int64_t n_equal = *m - n_less - n_more;
  if (*k < n_less) {
    *above = pivot;
    *cur = less;
    *m = n_less;
    return false;
  }
  if (*k < n_less + n_equal) {
    *lo_out = pivot;
    if (*k + 1 < n_less + n_equal) {
      *hi_out = pivot;
    } else if (n_more > 0) {
      *hi_out = *std::min_element(more, more + n_more);
    } else {
      *hi_out = *above;
    }
    return true;
  }
  *k -= n_less + n_equal;
  *cur = more;
  *m = n_more;
  return false;
}

// The k-th and (k + 1)-th values of cur[0, m) by the standard library's introselect: the way out when pivots keep
// failing (quickselect gives up after 64 rounds).
template <typename acc_t>
void introselect(acc_t* cur, int64_t m, int64_t k, acc_t above, acc_t* lo_out, acc_t* hi_out) {
  std::nth_element(cur, cur + k, cur + m);
  *lo_out = cur[k];
  *hi_out = k + 1 < m ? std::min(above, *std::min_element(cur + k + 1, cur + m)) : above;
}

// Where the r-quantile of n > 0 values sits when interpolating linearly at position r * (n - 1): `frac` of the way
// from the value at 0-based rank `rank` to the one at rank + 1.
template <typename acc_t>
struct QuantileAt {
  int64_t rank;
  acc_t frac;
};

template <typename acc_t>
QuantileAt<acc_t> quantile_at(int64_t n, acc_t r) {
  const acc_t position = static_cast<acc_t>(n - 1) * r;
  const acc_t lo = std::floor(position);
  return {std::min<int64_t>(static_cast<int64_t>(lo), n - 1), position - lo};
}

// The quantile from the values at `at.rank` (lo) and the rank after it (hi).
template <typename acc_t>
acc_t interpolate(const QuantileAt<acc_t>& at, int64_t n, acc_t lo, acc_t hi) {
  return at.frac > acc_t(0) && at.rank + 1 < n ? lo + at.frac * (hi - lo) : lo;
}

constexpr int kMaxRounds = 64;

}  // namespace rsoft_select

#ifdef RSOFT_SIMD_WIDTH
#include <immintrin.h>

namespace rsoft_simd {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kInf = std::numeric_limits<float>::infinity();

// exp's polynomial on [-ln2 / 2, ln2 / 2] (the one the portable rows use) and the Cody-Waite split of ln 2.
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                            4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

#if RSOFT_SIMD_WIDTH == 16
struct Ops {
  static constexpr int64_t kWidth = 16;
  using Vec = __m512;
  using Mask = __mmask16;

  static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static Vec load(const c10::BFloat16* p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  static Vec load(const c10::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
  static void store(c10::Half* p, Vec v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  static void store(c10::BFloat16* p, Vec v) {
    // Round to nearest even as c10::BFloat16 does; NaN becomes the quiet NaN 0x7FC0.
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1)),
                                          _mm512_set1_epi32(0x7FFF));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
    rounded = _mm512_mask_mov_epi32(rounded, unord(v), _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(rounded));
  }
  static Vec set1(float v) { return _mm512_set1_ps(v); }
  static Vec zero() { return _mm512_setzero_ps(); }
  static Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
  static Vec sub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
  static Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
  static Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static Vec fnmadd(Vec a, Vec b, Vec c) { return _mm512_fnmadd_ps(a, b, c); }
  // a > b ? a : b, so a NaN in `a` yields `b`.
  static Vec max(Vec a, Vec b) { return _mm512_max_ps(a, b); }
  static Vec min(Vec a, Vec b) { return _mm512_min_ps(a, b); }
  static Vec round(Vec a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // a * 2^n for integral n; a subnormal result is rounded once.
  static Vec scale(Vec a, Vec n) { return _mm512_scalef_ps(a, n); }
  static Mask lt(Vec a, Vec b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static Mask le(Vec a, Vec b) { return _mm512_cmp_ps_mask(a, b, _CMP_LE_OQ); }
  static Mask gt(Vec a, Vec b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static Mask eq(Vec a, Vec b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
  static Mask unord(Vec a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q); }
  // m ? a : b
  static Vec select(Mask m, Vec a, Vec b) { return _mm512_mask_blend_ps(m, b, a); }
  static Mask both(Mask a, Mask b) { return a & b; }
  static Mask either(Mask a, Mask b) { return a | b; }
  static uint32_t bits(Mask m) { return static_cast<uint32_t>(m); }
  // The mask whose lane i is set when bit i of `lanes` is.
  static Mask from_bits(uint32_t lanes) { return static_cast<Mask>(lanes); }
  // v with lane i taken from lane i ^ j (j = 1, 2, 4 or 8), by the cheapest shuffle that does it.
  template <int j>
  static Vec swap_lanes(Vec v) {
    static_assert(j == 1 || j == 2 || j == 4 || j == 8);
    if constexpr (j == 1) {
      return _mm512_permute_ps(v, 0xB1);
    } else if constexpr (j == 2) {
      return _mm512_permute_ps(v, 0x4E);
    } else if constexpr (j == 4) {
      return _mm512_shuffle_f32x4(v, v, 0xB1);
    } else {
      return _mm512_shuffle_f32x4(v, v, 0x4E);
    }
  }
  // Lane i of v in every lane.
  static Vec broadcast(Vec v, int64_t i) { return _mm512_permutexvar_ps(_mm512_set1_epi32(static_cast<int>(i)), v); }
  static float first(Vec v) { return _mm512_cvtss_f32(v); }
  // p[0, m) followed by `pad` in the other lanes (m <= kWidth); reads nothing past p + m.
  static Vec load_first(const float* p, int64_t m, float pad) {
    return _mm512_mask_loadu_ps(set1(pad), static_cast<Mask>((1u << m) - 1), p);
  }
  // The values at p[((2 * (first + i) + 1) * step) >> 16]: evenly spaced picks, with `step` in 16.16 fixed point.
  static Vec gather_spaced(const float* p, int first, int32_t step) {
    const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    const __m512i at = _mm512_add_epi32(odd, _mm512_set1_epi32(2 * first));
    return _mm512_i32gather_ps(_mm512_srli_epi32(_mm512_mullo_epi32(at, _mm512_set1_epi32(step)), 16), p, 4);
  }
  // Writes the lanes of v selected by m to dst[0, count) (dst needs kWidth slots) and returns count.
  static int64_t pack(float* dst, Vec v, Mask m) {
    // NOTE: compress into a register and store it whole: the compress-to-memory form is microcoded on some CPUs.
    _mm512_storeu_ps(dst, _mm512_maskz_compress_ps(m, v));
    return __builtin_popcount(bits(m));
  }
  static float sum(Vec v) { return _mm512_reduce_add_ps(v); }
  static float max_of(Vec v) { return _mm512_reduce_max_ps(v); }
};
#else
struct Ops {
  static constexpr int64_t kWidth = 8;
  using Vec = __m256;
  using Mask = __m256;

  static Vec load(const float* p) { return _mm256_loadu_ps(p); }
  static Vec load(const c10::BFloat16* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
  static Vec load(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
  static void store(c10::Half* p, Vec v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  static void store(c10::BFloat16* p, Vec v) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1)),
                                          _mm256_set1_epi32(0x7FFF));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, bias), 16);
    rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(unord(v)));
    // Pack the eight 32-bit lanes (each below 2^16) into 16-bit lanes, in order.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0xD8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
  static Vec set1(float v) { return _mm256_set1_ps(v); }
  static Vec zero() { return _mm256_setzero_ps(); }
  static Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
  static Vec sub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
  static Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
  static Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static Vec fnmadd(Vec a, Vec b, Vec c) { return _mm256_fnmadd_ps(a, b, c); }
  static Vec max(Vec a, Vec b) { return _mm256_max_ps(a, b); }
  static Vec min(Vec a, Vec b) { return _mm256_min_ps(a, b); }
  static Vec round(Vec a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static Vec scale(Vec a, Vec n) {
    // 2^n as two normal powers of two (n >= -150 here), so a subnormal result is rounded once.
    const __m256i ni = _mm256_cvtps_epi32(n);
    const __m256i half = _mm256_srai_epi32(ni, 1);
    const __m256i bias = _mm256_set1_epi32(127);
    const __m256 scale_a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
    const __m256 scale_b =
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, half), bias), 23));
    return _mm256_mul_ps(_mm256_mul_ps(a, scale_a), scale_b);
  }
  static Mask lt(Vec a, Vec b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  static Mask le(Vec a, Vec b) { return _mm256_cmp_ps(a, b, _CMP_LE_OQ); }
  static Mask gt(Vec a, Vec b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static Mask eq(Vec a, Vec b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
  static Mask unord(Vec a) { return _mm256_cmp_ps(a, a, _CMP_UNORD_Q); }
  static Vec select(Mask m, Vec a, Vec b) { return _mm256_blendv_ps(b, a, m); }
  static Mask both(Mask a, Mask b) { return _mm256_and_ps(a, b); }
  static Mask either(Mask a, Mask b) { return _mm256_or_ps(a, b); }
  static uint32_t bits(Mask m) { return static_cast<uint32_t>(_mm256_movemask_ps(m)); }
  static Mask from_bits(uint32_t lanes) {
    const __m256i lane_bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i set = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(lanes)), lane_bits);
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(set, lane_bits));
  }
  template <int j>
  static Vec swap_lanes(Vec v) {
    static_assert(j == 1 || j == 2 || j == 4);
    if constexpr (j == 1) {
      return _mm256_permute_ps(v, 0xB1);
    } else if constexpr (j == 2) {
      return _mm256_permute_ps(v, 0x4E);
    } else {
      return _mm256_permute2f128_ps(v, v, 0x01);
    }
  }
  static Vec broadcast(Vec v, int64_t i) {
    return _mm256_permutevar8x32_ps(v, _mm256_set1_epi32(static_cast<int>(i)));
  }
  static float first(Vec v) { return _mm256_cvtss_f32(v); }
  static Vec load_first(const float* p, int64_t m, float pad) {
    const __m256i inside = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(m)),
                                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_blendv_ps(set1(pad), _mm256_maskload_ps(p, inside), _mm256_castsi256_ps(inside));
  }
  static Vec gather_spaced(const float* p, int first, int32_t step) {
    const __m256i odd = _mm256_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15);
    const __m256i at = _mm256_add_epi32(odd, _mm256_set1_epi32(2 * first));
    return _mm256_i32gather_ps(p, _mm256_srli_epi32(_mm256_mullo_epi32(at, _mm256_set1_epi32(step)), 16), 4);
  }

  // For each 8-bit lane mask, a permutation that moves the selected lanes to the front, in order.
  struct PackTable {
    alignas(32) int32_t index[256][8];
    PackTable() {
      for (int mask = 0; mask < 256; ++mask) {
        int count = 0;
        for (int lane = 0; lane < 8; ++lane) {
          if (mask >> lane & 1) {
            index[mask][count++] = lane;
          }
        }
        for (; count < 8; ++count) {
          index[mask][count] = 0;
        }
      }
    }
  };
  static int64_t pack(float* dst, Vec v, Mask m) {
    static const PackTable table;
    const uint32_t b = bits(m);
    const __m256i order = _mm256_load_si256(reinterpret_cast<const __m256i*>(table.index[b]));
    _mm256_storeu_ps(dst, _mm256_permutevar8x32_ps(v, order));
    return __builtin_popcount(b);
  }
  static float sum(Vec v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
  }
  static float max_of(Vec v) {
    const __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
  }
};
#endif

using Vec = Ops::Vec;
using Mask = Ops::Mask;
constexpr int64_t kWidth = Ops::kWidth;

inline int64_t padded(int64_t k_len) { return (k_len + kWidth - 1) / kWidth * kWidth; }

// exp with float32 semantics: exact 0 below -104 and for -inf, NaN kept, subnormal results rounded once, about
// 1 ulp elsewhere (inputs are at most 0 here). Lanes below -104 compute exp(0) and are zeroed afterwards, so masked
// keys never produce subnormal intermediates, which are slow on many CPUs.
inline Vec exp(Vec x) {
  const Mask underflow = Ops::lt(x, Ops::set1(-104.0f));
  const Vec clamped = Ops::min(Ops::select(underflow, Ops::zero(), x), Ops::zero());
  const Vec n = Ops::round(Ops::mul(clamped, Ops::set1(kLog2e)));
  Vec r = Ops::fnmadd(n, Ops::set1(kLn2Hi), clamped);
  r = Ops::fnmadd(n, Ops::set1(kLn2Lo), r);
  Vec p = Ops::set1(kPoly[0]);
  for (int i = 1; i < 6; ++i) {
    p = Ops::fmadd(p, r, Ops::set1(kPoly[i]));
  }
  p = Ops::add(Ops::fmadd(p, Ops::mul(r, r), r), Ops::set1(1.0f));
  const Vec result = Ops::select(underflow, Ops::zero(), Ops::scale(p, n));
  return Ops::select(Ops::unord(x), x, result);
}

// Copies a row into `dst` as float and pads it to a multiple of kWidth with `pad`.
template <typename scalar_t>
inline void stage(const scalar_t* src, int64_t k_len, float* dst, float pad) {
  int64_t i = 0;
  for (; i + kWidth <= k_len; i += kWidth) {
    Ops::store(dst + i, Ops::load(src + i));
  }
  for (; i < k_len; ++i) {
    dst[i] = static_cast<float>(src[i]);
  }
  for (; i < padded(k_len); ++i) {
    dst[i] = pad;
  }
}

// Writes the first k_len values of a staged row to `dst`, rounding to its dtype.
template <typename scalar_t>
inline void unstage(const float* src, int64_t k_len, scalar_t* dst) {
  int64_t i = 0;
  for (; i + kWidth <= k_len; i += kWidth) {
    Ops::store(dst + i, Ops::load(src + i));
  }
  for (; i < k_len; ++i) {
    dst[i] = static_cast<scalar_t>(src[i]);
  }
}

// Splits src[0, m) into the values below and above `pivot`; `less` and `more` need m + kWidth slots.
inline void partition(const float* src, int64_t m, float pivot, float* less, float* more, int64_t* n_less_out,
                      int64_t* n_more_out) {
  const Vec p = Ops::set1(pivot);
  int64_t n_less = 0;
  int64_t n_more = 0;
  int64_t i = 0;
  for (; i + kWidth <= m; i += kWidth) {
    const Vec v = Ops::load(src + i);
    n_less += Ops::pack(less + n_less, v, Ops::lt(v, p));
    n_more += Ops::pack(more + n_more, v, Ops::gt(v, p));
  }
  for (; i < m; ++i) {
    const float v = src[i];
    less[n_less] = v;
    n_less += v < pivot;
    more[n_more] = v;
    n_more += v > pivot;
  }
  *n_less_out = n_less;
  *n_more_out = n_more;
}

// Bitonic sorting network over V vectors (V * kWidth values, V a power of two): v[0] ends up holding the smallest
// kWidth values in ascending lane order, v[V - 1] the largest. Stage (k, j) compares each value with the one j places
// away, in ascending order inside each block of k values whose index has bit k clear and descending otherwise.
constexpr uint32_t keeps_min(int vector, int k, int j) {
  uint32_t lanes = 0;
  for (int i = 0; i < kWidth; ++i) {
    const bool ascending = ((vector * kWidth + i) & k) == 0;
    const bool first = (i & j) == 0;
    lanes |= static_cast<uint32_t>(ascending == first) << i;
  }
  return lanes;
}

template <int V, int k, int j>
inline void bitonic_stage(Vec* v) {
  if constexpr (j >= kWidth) {
    // Partners sit in different vectors, and each vector's block order is the same for all its lanes.
    for (int a = 0; a < V; ++a) {
      const int b = a ^ (j / kWidth);
      if (b > a) {
        const Vec lo = Ops::min(v[a], v[b]);
        const Vec hi = Ops::max(v[a], v[b]);
        const bool ascending = ((a * kWidth) & k) == 0;
        v[a] = ascending ? lo : hi;
        v[b] = ascending ? hi : lo;
      }
    }
  } else {
    for (int a = 0; a < V; ++a) {
      const Vec partner = Ops::template swap_lanes<j>(v[a]);
      v[a] = Ops::select(Ops::from_bits(keeps_min(a, k, j)), Ops::min(v[a], partner), Ops::max(v[a], partner));
    }
  }
  if constexpr (j > 1) {
    bitonic_stage<V, k, j / 2>(v);
  } else if constexpr (k < V * kWidth) {
    bitonic_stage<V, 2 * k, k>(v);
  }
}

template <int V>
inline void sort_vectors(Vec* v) {
  bitonic_stage<V, 2, 1>(v);
}

// How many of v[0, n) (n a multiple of kWidth) are below each of x0, x1 and x2 (each the same in every lane), in one
// pass.
inline void count_below3(const float* v, int64_t n, Vec x0, Vec x1, Vec x2, int64_t* counts) {
  int64_t c0 = 0;
  int64_t c1 = 0;
  int64_t c2 = 0;
  for (int64_t i = 0; i < n; i += kWidth) {
    const Vec x = Ops::load(v + i);
    c0 += __builtin_popcount(Ops::bits(Ops::lt(x, x0)));
    c1 += __builtin_popcount(Ops::bits(Ops::lt(x, x1)));
    c2 += __builtin_popcount(Ops::bits(Ops::lt(x, x2)));
  }
  counts[0] = c0;
  counts[1] = c1;
  counts[2] = c2;
}

// Value i of V vectors, in every lane.
template <int V>
inline Vec value_at(const Vec* v, int64_t i) {
  Vec value = Ops::broadcast(v[0], i & (kWidth - 1));
  for (int a = 1; a < V; ++a) {
    value = i / kWidth == a ? Ops::broadcast(v[a], i & (kWidth - 1)) : value;
  }
  return value;
}

// Order statistics k and k + 1 of v[0, m), k < m <= V * kWidth, by sorting V vectors; `above` stands for the
// (k + 1)-th when k + 1 == m.
template <int V>
inline void select_sorted(float* v, int64_t m, int64_t k, float above, float* lo_out, float* hi_out) {
  Vec sorted[V];
  for (int a = 0; a < V; ++a) {
    sorted[a] = Ops::load_first(v + a * kWidth, std::clamp<int64_t>(m - a * kWidth, 0, kWidth), kInf);
  }
  sort_vectors<V>(sorted);
  // Read the two values out of the registers: storing the vectors and loading one float back stalls on some CPUs.
  *lo_out = Ops::first(value_at<V>(sorted, k));
  *hi_out = k + 1 < m ? Ops::first(value_at<V>(sorted, k + 1)) : above;
}

// The sample that select_short() sorts: 16 values, one or two vectors. Its search quarters the candidates per pass.
constexpr int kSample = 16;
constexpr int kSampleVectors = kSample / kWidth;
// select_short() computes its sample's places in 32-bit fixed point, which stays far from overflow for rows below
// this length; longer rows go to quickselect directly.
constexpr int64_t kShortLimit = int64_t{1} << 14;

// Order statistics k and k + 1 of a row v[0, n) (n a multiple of kWidth, 2 * kWidth < n < kShortLimit), with no
// data-dependent branch until the end. It sorts an evenly spaced sample of kSample values with a sorting network, then
// finds the two neighbouring sample values that enclose rank k by a search over the sample that counts, in each pass
// over the row, how many values lie below three probes; one last pass keeps the values between the two. When at most
// 2 * kWidth are left it sorts them and returns true. Otherwise it returns false with `mid`, `k`, `m` and `above`
// describing the remaining range for quickselect to finish. `mid` needs n + kWidth slots.
inline bool select_short(const float* v, int64_t n, float* mid, int64_t* k, int64_t* m, float* above, float* lo_out,
                         float* hi_out) {
  static_assert(kSample == 16 && kSampleVectors * kWidth == kSample);
  // Evenly spaced picks: the middles of kSample equal parts of the row.
  const auto step = static_cast<int32_t>((n << 16) / (2 * kSample));
  Vec sample[kSampleVectors];
  for (int a = 0; a < kSampleVectors; ++a) {
    sample[a] = Ops::gather_spaced(v, a * kWidth, step);
  }
  sort_vectors<kSampleVectors>(sample);
  // The probes are the kSample - 1 smallest sample values: `taken` of them are at most the k-th value, and `below`
  // values of the row lie under the largest of those. Two passes of three probes each: 16 candidates, then 4, then 1.
  int taken = 0;
  int64_t below = 0;
  for (int quarter = kSample / 4; quarter >= 1; quarter /= 4) {
    int64_t counts[3];
    count_below3(v, n, value_at<kSampleVectors>(sample, taken + quarter - 1),
                 value_at<kSampleVectors>(sample, taken + 2 * quarter - 1),
                 value_at<kSampleVectors>(sample, taken + 3 * quarter - 1), counts);
    const bool pass0 = counts[0] <= *k;
    const bool pass1 = counts[1] <= *k;
    const bool pass2 = counts[2] <= *k;
    below = pass2 ? counts[2] : pass1 ? counts[1] : pass0 ? counts[0] : below;
    taken += quarter * (pass0 + pass1 + pass2);
  }
  // The keys from lo up to below hi, where hi is the next sample value; when every probe passed there is no upper
  // bound (and +inf keys belong to the range too).
  const bool bounded = taken < kSample - 1;
  const Vec lo_v = taken > 0 ? value_at<kSampleVectors>(sample, taken - 1) : Ops::set1(kNegInf);
  const Vec hi_v = bounded ? value_at<kSampleVectors>(sample, taken) : Ops::set1(kInf);
  const Mask unbounded = Ops::from_bits(bounded ? 0u : (1u << kWidth) - 1);
  const float hi = Ops::first(hi_v);
  int64_t n_mid = 0;
  for (int64_t i = 0; i < n; i += kWidth) {
    const Vec x = Ops::load(v + i);
    n_mid += Ops::pack(mid + n_mid, x, Ops::both(Ops::le(lo_v, x), Ops::either(Ops::lt(x, hi_v), unbounded)));
  }
  // A bounded hi is one of the row's values with more than k values under it: it is the (k + 1)-th value when that
  // one is not between lo and hi. Unbounded, the range runs to the end of the row, and hi = +inf stands for the
  // (k + 1)-th only when k is the last rank.
  *k -= below;
  *m = n_mid;
  *above = hi;
  if (n_mid <= kWidth) {
    select_sorted<1>(mid, n_mid, *k, hi, lo_out, hi_out);
    return true;
  }
  if (n_mid <= 2 * kWidth) {
    select_sorted<2>(mid, n_mid, *k, hi, lo_out, hi_out);
    return true;
  }
  return false;
}

// Order statistics k and k + 1 (0-based) of values[0, n) (n a multiple of kWidth), which holds no NaN but may hold
// infinities; the (k + 1)-th is +inf when k + 1 == n. Rows of up to two vectors are sorted whole; longer ones go
// through select_short(). In the rare rows where that leaves more than two vectors' worth, and in rows of kShortLimit
// keys or more, quickselect finishes: vector partitions around a pivot aimed at rank k (the element at k's relative
// rank in a sorted sample of seven) until one vector is left, which is sorted.
// `values`, `spare_a` and `spare_b` each hold n + kWidth slots and are overwritten.
inline void select_pair(float* values, float* spare_a, float* spare_b, int64_t n, int64_t k, float* lo_out,
                        float* hi_out) {
  float* cur = values;
  float* bufs[3] = {values, spare_a, spare_b};
  int64_t m = n;
  // The smallest value known to lie above the active range (the (k + 1)-th when k ends up last).
  float above = kInf;
  if (m <= kWidth) {
    select_sorted<1>(cur, m, k, above, lo_out, hi_out);
    return;
  }
  if (m <= 2 * kWidth) {
    select_sorted<2>(cur, m, k, above, lo_out, hi_out);
    return;
  }
  if (m < kShortLimit) {
    if (select_short(cur, m, spare_a, &k, &m, &above, lo_out, hi_out)) {
      return;
    }
    cur = spare_a;
  }
  int rounds = 0;
  while (m > kWidth) {
    if (++rounds > rsoft_select::kMaxRounds) {
      rsoft_select::introselect(cur, m, k, above, lo_out, hi_out);
      return;
    }
    float sample[7];
    const int64_t stride = m / 7;
    for (int j = 0; j < 7; ++j) {
      sample[j] = cur[j * stride + stride / 2];
    }
    // A sorting network for seven values.
    constexpr int kNetwork[16][2] = {{1, 2}, {3, 4}, {5, 6}, {0, 2}, {3, 5}, {4, 6}, {0, 1}, {4, 5},
                                     {2, 6}, {0, 4}, {1, 5}, {0, 3}, {2, 5}, {1, 3}, {2, 4}, {2, 3}};
    for (const auto& pair : kNetwork) {
      const float a = sample[pair[0]];
      const float b = sample[pair[1]];
      sample[pair[0]] = std::min(a, b);
      sample[pair[1]] = std::max(a, b);
    }
    const float pivot = sample[std::min<int64_t>((k * 7 + m / 2) / m, 6)];
    float* less = cur == bufs[0] ? bufs[1] : bufs[0];
    float* more = cur == bufs[2] ? bufs[1] : bufs[2];
    int64_t n_less = 0;
    int64_t n_more = 0;
    partition(cur, m, pivot, less, more, &n_less, &n_more);
    if (rsoft_select::narrow(pivot, less, n_less, more, n_more, &cur, &m, &k, &above, lo_out, hi_out)) {
      return;
    }
  }
  select_sorted<1>(cur, m, k, above, lo_out, hi_out);
}

// Per-thread scratch: `count` float rows of the padded length plus one vector of slack each.
class Scratch {
 public:
  Scratch(int64_t k_len, int count) : stride_(padded(k_len) + kWidth), data_(count * stride_) {}
  float* row(int i) { return data_.data() + i * stride_; }

 private:
  int64_t stride_;
  std::vector<float> data_;
};

template <typename scalar_t>
void forward_rows(const scalar_t* x, const float* r, scalar_t* out, float* stats, int64_t* argmax, int64_t rows,
                  int64_t k_len, float eps, int64_t grain) {
  const int64_t width = padded(k_len);
  const bool direct = std::is_same_v<scalar_t, float> && width == k_len;
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    Scratch scratch(k_len, 5);
    float* staged = scratch.row(0);
    float* e = scratch.row(1);
    float* sel = scratch.row(2);
    float* spare_a = scratch.row(3);
    float* spare_b = scratch.row(4);
    for (int64_t row = begin; row < end; ++row) {
      const float* xr = staged;
      float* outr = staged;
      if (direct) {
        xr = reinterpret_cast<const float*>(x) + row * k_len;
        outr = reinterpret_cast<float*>(out) + row * k_len;
      } else {
        stage(x + row * k_len, k_len, staged, kNegInf);
      }

      // Pass 1: the max (NaN is skipped, as in the portable rows), then its first index.
      Vec top_v = Ops::set1(kNegInf);
      for (int64_t i = 0; i < width; i += kWidth) {
        top_v = Ops::max(Ops::load(xr + i), top_v);
      }
      const float top = Ops::max_of(top_v);
      // Scanned backwards without an early exit, whose place would vary from row to row and mispredict.
      int64_t top_index = 0;
      for (int64_t i = width - kWidth; i >= 0; i -= kWidth) {
        const uint32_t hit = Ops::bits(Ops::eq(Ops::load(xr + i), Ops::set1(top)));
        top_index = hit != 0 ? i + __builtin_ctz(hit) : top_index;
      }
      top_index = top_index < k_len ? top_index : 0;
      const bool finite_top = std::isfinite(top);
      const float shift_value = finite_top ? top : 0.0f;
      const Vec shift = Ops::set1(shift_value);

      // Pass 2: exponentials, and the shifted scores for selection with masked keys (e == 0, or NaN) at -inf,
      // below every unmasked key, so that the unmasked keys' order statistics sit above them.
      int64_t n = 0;
      for (int64_t i = 0; i < width; i += kWidth) {
        const Vec z = Ops::sub(Ops::load(xr + i), shift);
        const Vec ez = exp(z);
        const Mask keep = Ops::gt(ez, Ops::zero());
        Ops::store(e + i, ez);
        Ops::store(sel + i, Ops::select(keep, z, Ops::set1(kNegInf)));
        n += __builtin_popcount(Ops::bits(keep));
      }

      // The r-quantile of the unmasked z's (0 when there are none): their ranks sit above the width - n masked keys
      // at -inf.
      float quantile = 0.0f;
      if (n > 0) {
        const auto at = rsoft_select::quantile_at(n, r[row]);
        float lo = 0.0f;
        float hi = 0.0f;
        select_pair(sel, spare_a, spare_b, width, at.rank + (width - n), &lo, &hi);
        quantile = rsoft_select::interpolate(at, n, lo, hi);
      }
      const float t = -quantile + eps;

      // Pass 3: weights times exponentials and their sum; pass 4: normalisation.
      const Vec t_v = Ops::set1(t);
      Vec sum_v = Ops::zero();
      for (int64_t i = 0; i < width; i += kWidth) {
        const Vec z = Ops::sub(Ops::load(xr + i), shift);
        // max(0, v) is 0 > v ? 0 : v, so a NaN weight stays NaN.
        const Vec we = Ops::mul(Ops::max(Ops::zero(), Ops::add(z, t_v)), Ops::load(e + i));
        Ops::store(e + i, we);
        sum_v = Ops::add(sum_v, we);
      }
      const float total = Ops::sum(sum_v);
      // A fully masked row gives 0 * 1; a NaN among the scores makes the total NaN and the whole row NaN.
      const Vec inv = Ops::set1(1.0f / (total == 0.0f ? 1.0f : total));
      for (int64_t i = 0; i < width; i += kWidth) {
        Ops::store(outr + i, Ops::mul(Ops::load(e + i), inv));
      }
      if (!direct) {
        unstage(staged, k_len, out + row * k_len);
      }
      stats[3 * row] = shift_value;
      stats[3 * row + 1] = t;
      stats[3 * row + 2] = total;
      argmax[row] = finite_top ? top_index : -1;
    }
  });
}

template <typename scalar_t>
void backward_rows(const scalar_t* grad, const scalar_t* x, const float* stats, const int64_t* argmax,
                   scalar_t* grad_x, int64_t rows, int64_t k_len, int64_t grain) {
  const int64_t width = padded(k_len);
  const bool direct = std::is_same_v<scalar_t, float> && width == k_len;
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    Scratch scratch(k_len, 4);
    float* staged_x = scratch.row(0);
    float* staged_g = scratch.row(1);
    float* staged_dx = scratch.row(2);
    float* slope = scratch.row(3);
    for (int64_t row = begin; row < end; ++row) {
      const float* xr = staged_x;
      const float* gr = staged_g;
      float* dxr = staged_dx;
      if (direct) {
        xr = reinterpret_cast<const float*>(x) + row * k_len;
        gr = reinterpret_cast<const float*>(grad) + row * k_len;
        dxr = reinterpret_cast<float*>(grad_x) + row * k_len;
      } else {
        stage(x + row * k_len, k_len, staged_x, kNegInf);
        stage(grad + row * k_len, k_len, staged_g, 0.0f);
      }
      const float total = stats[3 * row + 2];
      if (total == 0.0f) {
        std::fill(dxr, dxr + width, 0.0f);
      } else {
        const Vec shift = Ops::set1(stats[3 * row]);
        const Vec t = Ops::set1(stats[3 * row + 1]);
        const Vec inv = Ops::set1(1.0f / total);
        // Pass 1: sum_j g_j p_j, and ds_i/dz_i = e_i * (1[z_i + t > 0] + w_i).
        Vec gp_v = Ops::zero();
        for (int64_t i = 0; i < width; i += kWidth) {
          const Vec z = Ops::sub(Ops::load(xr + i), shift);
          const Vec ez = exp(z);
          const Vec lifted = Ops::add(z, t);
          const Vec w = Ops::max(Ops::zero(), lifted);
          gp_v = Ops::fmadd(Ops::load(gr + i), Ops::mul(Ops::mul(w, ez), inv), gp_v);
          const Vec step = Ops::select(Ops::gt(lifted, Ops::zero()), Ops::set1(1.0f), Ops::zero());
          Ops::store(slope + i, Ops::mul(ez, Ops::add(step, w)));
        }
        const Vec gp = Ops::set1(Ops::sum(gp_v));
        // Pass 2: dz, and its sum, which is the gradient that flows into the max.
        Vec dz_sum = Ops::zero();
        for (int64_t i = 0; i < width; i += kWidth) {
          const Vec dz = Ops::mul(Ops::mul(Ops::sub(Ops::load(gr + i), gp), inv), Ops::load(slope + i));
          Ops::store(dxr + i, dz);
          dz_sum = Ops::add(dz_sum, dz);
        }
        const int64_t top = argmax[row];
        if (top >= 0) {
          dxr[top] -= Ops::sum(dz_sum);
        }
      }
      if (!direct) {
        unstage(staged_dx, k_len, grad_x + row * k_len);
      }
    }
  });
}

}  // namespace rsoft_simd
#endif  // RSOFT_SIMD_WIDTH
