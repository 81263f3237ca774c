// bfloat16 dot products with AVX512-BF16 (vdpbf16ps) for the decode kernel:
// one instruction multiplies 32 bf16 pairs exactly and adds them into 16
// float32 lanes, instead of widening 16 values (2 instructions) and one FMA.
// On a 2-vCPU Xeon decode is bound by instruction issue, not memory
// (docs/CPU_KERNEL.md), so fewer instructions per byte is what moves it. Built only where the compiler targets AVX512-BF16.
#pragma once

#include "isa_namespace.h"

#if defined(__AVX512BF16__)
#define FASTATTN_HAVE_BF16_DOT 1

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "../common/dtypes.h"
#include "vec_math.h"

namespace fastattn {
namespace cpu {
inline namespace FASTATTN_ISA_NS {

// Values per vdpbf16ps operand.
constexpr int64_t kBf16Chunk = 32;

inline __m512bh load_bf16x32(const bf16_t* src) {
  return (__m512bh)_mm512_loadu_si512(src);
}

// lanes i += a[2i] * b[2i] + a[2i+1] * b[2i+1] over 32 consecutive values.
inline vfloat dot_pairs(vfloat acc, __m512bh a, __m512bh b) {
  return (vfloat)_mm512_dpbf16_ps((__m512)acc, a, b);
}

// 16 float weights rounded to bf16 and packed in pairs: dword i holds
// (w[2i], w[2i+1]), the operand layout that pairs key 2i with key 2i + 1.
inline void pack_weight_pairs(const float* weights, uint32_t* pairs) {
  const __m256bh packed = _mm512_cvtneps_pbh(_mm512_loadu_ps(weights));
  std::memcpy(pairs, &packed, 8 * sizeof(uint32_t));
}

// Rows a and b interleaved value by value, as vdpbf16ps wants two keys'
// values of one dimension side by side. unpack works within 128-bit lanes,
// so `low` holds dims 8k..8k+3 and `high` dims 8k+4..8k+7 of each 8-value
// group k: accumulators built from them are in "pair order" (see below).
inline void interleave_rows(__m512bh a, __m512bh b, __m512bh* low, __m512bh* high) {
  *low = (__m512bh)_mm512_unpacklo_epi16((__m512i)a, (__m512i)b);
  *high = (__m512bh)_mm512_unpackhi_epi16((__m512i)a, (__m512i)b);
}

// acc lanes += w_a * a + w_b * b for one interleaved vector; `pair` is
// (w_a, w_b) as two bf16 in one dword.
inline vfloat weighted_pairs(vfloat acc, __m512bh interleaved, uint32_t pair) {
  return dot_pairs(acc, interleaved, (__m512bh)_mm512_set1_epi32(int32_t(pair)));
}

// Head-dim index of position p of an accumulator row in pair order: each
// 32-dim chunk c is stored as [low: dims 8k..8k+3 for k = 0..3][high: 8k+4..8k+7].
inline int64_t pair_order_dim(int64_t p) {
  const int64_t chunk = p / 32, half = (p / 16) % 2, k = (p % 16) / 4, m = p % 4;
  return chunk * 32 + 8 * k + 4 * half + m;
}

}  // namespace FASTATTN_ISA_NS
}  // namespace cpu
}  // namespace fastattn

#endif  // __AVX512BF16__
