// 16-lane float vectors (GCC/Clang vector extensions) and the few math
// routines the CPU kernels need on them. Vector extensions keep one source
// for AVX-512 (one zmm per vector), AVX2 (two ymm) and NEON (four q), chosen
// by -march at build time.
#pragma once

#include "isa_namespace.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "../common/dtypes.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace fastattn {
namespace cpu {
inline namespace FASTATTN_ISA_NS {

constexpr int kLanes = 16;
typedef float vfloat __attribute__((vector_size(kLanes * 4)));
typedef int32_t vint __attribute__((vector_size(kLanes * 4)));
// Unaligned, aliasing view used for every load and store.
typedef float vfloat_unaligned __attribute__((vector_size(kLanes * 4), aligned(4), may_alias));

inline vfloat load(const float* p) { return *reinterpret_cast<const vfloat_unaligned*>(p); }
inline void store(float* p, vfloat x) { *reinterpret_cast<vfloat_unaligned*>(p) = x; }
inline vfloat splat(float x) { return vfloat{} + x; }

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
// AVX2: a vfloat is two ymm registers. GCC lowers generic 16-lane code with
// compares, integer views and lane loops through the stack, so the math
// below works on the two halves with AVX2 intrinsics.
#define FASTATTN_AVX2_HALVES 1
inline __m256 low_half(vfloat x) { return __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7); }
inline __m256 high_half(vfloat x) { return __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15); }
inline vfloat from_halves(__m256 low, __m256 high) {
  return __builtin_shufflevector(low, high, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}
inline float horizontal_max8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}
inline float horizontal_sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
// e^x on 8 lanes: the generic algorithm below with AVX2 rounding and
// exponent construction; 0 below -87.3 (and for -inf).
inline __m256 exp8(__m256 x) {
  const __m256 in_range = _mm256_cmp_ps(x, _mm256_set1_ps(-87.33654f), _CMP_GE_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.33654f)), _mm256_set1_ps(88.37626f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 poly = _mm256_set1_ps(1.9875691500e-4f);
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.3981999507e-3f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(8.3334519073e-3f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(4.1665795894e-2f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.6666665459e-1f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(5.0000001201e-1f));
  poly = _mm256_fmadd_ps(_mm256_mul_ps(poly, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(poly, _mm256_castsi256_ps(pow2n)), in_range);
}
#endif

inline float reduce_max(vfloat x) {
#if defined(__AVX512F__)
  return _mm512_reduce_max_ps((__m512)x);
#elif defined(FASTATTN_AVX2_HALVES)
  return horizontal_max8(_mm256_max_ps(low_half(x), high_half(x)));
#else
  float best = x[0];
  for (int i = 1; i < kLanes; ++i) best = x[i] > best ? x[i] : best;
  return best;
#endif
}

inline float reduce_sum(vfloat x) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps((__m512)x);
#elif defined(FASTATTN_AVX2_HALVES)
  return horizontal_sum8(_mm256_add_ps(low_half(x), high_half(x)));
#else
  float total = 0.f;
  for (int i = 0; i < kLanes; ++i) total += x[i];
  return total;
#endif
}

inline vfloat vmax(vfloat a, vfloat b) {
#if defined(FASTATTN_AVX2_HALVES)
  return from_halves(_mm256_max_ps(low_half(a), low_half(b)), _mm256_max_ps(high_half(a), high_half(b)));
#else
  return a > b ? a : b;
#endif
}

// e^x for a vector, relative error < 2e-7 over the float range; exactly 0
// for very negative x (and for -inf, which masked logits are), so masked keys add
// nothing. Cephes-style: x = n ln2 + r with |r| <= ln2/2, e^r by a degree-6
// polynomial, 2^n built in the exponent bits.
inline vfloat vexp(vfloat x) {
#if defined(__AVX512F__)
  // 12 instructions instead of 18: hardware rounding (vrndscaleps) and
  // 2^n scaling with underflow to exactly 0 (vscalefps). Inputs below -104
  // (masked logits are -inf) give 2^-150 * p -> 0.
  const __m512 clamped = _mm512_max_ps((__m512)x, _mm512_set1_ps(-104.f));
  const __m512 xc = _mm512_min_ps(clamped, _mm512_set1_ps(88.37626f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 poly = _mm512_set1_ps(1.9875691500e-4f);
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.3981999507e-3f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(8.3334519073e-3f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(4.1665795894e-2f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.6666665459e-1f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(5.0000001201e-1f));
  poly = _mm512_fmadd_ps(_mm512_mul_ps(poly, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return (vfloat)_mm512_scalef_ps(poly, n);
#elif defined(FASTATTN_AVX2_HALVES)
  return from_halves(exp8(low_half(x)), exp8(high_half(x)));
#else
  const vfloat lower = splat(-87.33654f), upper = splat(88.37626f);
  const vint in_range = x >= lower;
  x = vmax(x, lower);
  x = upper - vmax(upper - x, splat(0.f));  // min(x, upper)
  const vfloat scaled = x * 1.44269504088896341f + 0.5f;
  vint n = __builtin_convertvector(scaled, vint);
  n += (__builtin_convertvector(n, vfloat) > scaled);  // truncation -> floor
  const vfloat nf = __builtin_convertvector(n, vfloat);
  const vfloat r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  vfloat poly = splat(1.9875691500e-4f);
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  poly = poly * r * r + r + 1.0f;
  const vint pow2n = (n + 127) << 23;
  vfloat two_n;
  std::memcpy(&two_n, &pow2n, sizeof(two_n));
  const vfloat result = poly * two_n;
  vint bits;
  std::memcpy(&bits, &result, sizeof(bits));
  bits &= in_range;
  vfloat masked;
  std::memcpy(&masked, &bits, sizeof(masked));
  return masked;
#endif
}

// Horizontal sums of 16 vectors at once: result[j] = sum of the lanes of
// v[slot(j)], where slot(j) = (j % 4) * 4 + j / 4 (store key j's vector in
// that slot). A four-level shuffle-and-add tree: 30 instructions for all 16
// sums instead of 8 per sum.
inline int transpose_sum_slot(int j) { return (j % 4) * 4 + j / 4; }

inline vfloat transpose_sum16(const vfloat* v) {
#if defined(__AVX512F__)
  __m512 level1[8], level2[4], level3[2];
  for (int i = 0; i < 8; ++i) {  // 256-bit halves
    const __m512 a = (__m512)v[2 * i], b = (__m512)v[2 * i + 1];
    level1[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  }
  for (int i = 0; i < 4; ++i) {  // 128-bit blocks
    const __m512 a = level1[2 * i], b = level1[2 * i + 1];
    level2[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
  }
  for (int i = 0; i < 2; ++i) {  // pairs of lanes within blocks
    const __m512 a = level2[2 * i], b = level2[2 * i + 1];
    level3[i] = _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x44), _mm512_shuffle_ps(a, b, 0xEE));
  }
  return (vfloat)_mm512_add_ps(_mm512_shuffle_ps(level3[0], level3[1], 0x88),
                               _mm512_shuffle_ps(level3[0], level3[1], 0xDD));
#else
  vfloat result;
  for (int j = 0; j < kLanes; ++j) result[j] = reduce_sum(v[transpose_sum_slot(j)]);
  return result;
#endif
}

// 16 consecutive storage elements widened to float32 lanes.
typedef uint16_t vhalf_bits __attribute__((vector_size(kLanes * 2), aligned(2), may_alias));

inline vfloat load_as_float(const float* src) { return load(src); }

inline vfloat load_as_float(const bf16_t* src) {
  // bf16 is the top half of a float32: widen and shift.
#if defined(__AVX512F__)
  __m256i halves;
  std::memcpy(&halves, src, sizeof(halves));
  return (vfloat)_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16));
#else
  const vint bits = __builtin_convertvector(*reinterpret_cast<const vhalf_bits*>(src), vint) << 16;
  vfloat result;
  std::memcpy(&result, &bits, sizeof(result));
  return result;
#endif
}

inline vfloat load_as_float(const f16_t* src) {
#if defined(__AVX512F__)
  __m256i halves;
  std::memcpy(&halves, src, sizeof(halves));
  return (vfloat)_mm512_cvtph_ps(halves);
#else
  vfloat result;
  for (int i = 0; i < kLanes; ++i) result[i] = to_float(src[i]);
  return result;
#endif
}

inline float scalar_exp(float x) {
  return x == -std::numeric_limits<float>::infinity() ? 0.f : std::exp(x);
}

}  // namespace FASTATTN_ISA_NS
}  // namespace cpu
}  // namespace fastattn
