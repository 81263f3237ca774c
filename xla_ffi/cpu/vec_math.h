// 16-lane float vectors (GCC/Clang vector extensions) and the few math
// routines the CPU kernels need on them. Vector extensions keep one source
// for AVX-512 (one zmm per vector), AVX2 (two ymm) and NEON (four q), chosen
// by -march at build time.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace fastattn {
namespace cpu {

constexpr int kLanes = 16;
typedef float vfloat __attribute__((vector_size(kLanes * 4)));
typedef int32_t vint __attribute__((vector_size(kLanes * 4)));
// Unaligned, aliasing view used for every load and store.
typedef float vfloat_unaligned __attribute__((vector_size(kLanes * 4), aligned(4), may_alias));

inline vfloat load(const float* p) { return *reinterpret_cast<const vfloat_unaligned*>(p); }
inline void store(float* p, vfloat x) { *reinterpret_cast<vfloat_unaligned*>(p) = x; }
inline vfloat splat(float x) { return vfloat{} + x; }

inline float reduce_max(vfloat x) {
  float best = x[0];
  for (int i = 1; i < kLanes; ++i) best = x[i] > best ? x[i] : best;
  return best;
}

inline float reduce_sum(vfloat x) {
  float total = 0.f;
  for (int i = 0; i < kLanes; ++i) total += x[i];
  return total;
}

inline vfloat vmax(vfloat a, vfloat b) { return a > b ? a : b; }

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

inline float scalar_exp(float x) {
  return x == -std::numeric_limits<float>::infinity() ? 0.f : std::exp(x);
}

}  // namespace cpu
}  // namespace fastattn
