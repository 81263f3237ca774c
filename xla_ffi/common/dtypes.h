// Scalar conversions between the storage dtypes (f32, bf16, f16) and the
// float32 the kernels compute in. Plain bit manipulation so the same code
// builds with any C++17 compiler and on any host architecture.
#pragma once

#include <cstdint>
#include <cstring>

namespace fastattn {

enum class ElementType { kF32 = 0, kBF16 = 1, kF16 = 2 };

struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

// Calls fn(T{}) with the storage type of `type`: the one place a runtime
// dtype becomes a template parameter.
template <typename Fn>
void dispatch_element_type(ElementType type, Fn&& fn);

inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
}

inline float to_float(float x) { return x; }
inline float to_float(bf16_t x) { return bits_to_float(uint32_t{x.bits} << 16); }

inline float to_float(f16_t x) {
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  const uint32_t exponent = (x.bits >> 10) & 0x1fu;
  const uint32_t mantissa = x.bits & 0x3ffu;
  if (exponent == 0x1f) {  // inf / nan
    return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  }
  if (exponent != 0) {  // normal
    return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  }
  // zero or subnormal: value = mantissa * 2^-24
  const float magnitude = float(mantissa) * 5.9604644775390625e-8f;
  return sign ? -magnitude : magnitude;
}

// Round to nearest even, as XLA's own converts do.
inline void from_float(float x, float* out) { *out = x; }

inline void from_float(float x, bf16_t* out) {
  uint32_t bits = float_to_bits(x);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {  // nan stays a quiet nan
    out->bits = uint16_t((bits >> 16) | 0x40u);
    return;
  }
  bits += 0x7fffu + ((bits >> 16) & 1u);
  out->bits = uint16_t(bits >> 16);
}

inline void from_float(float x, f16_t* out) {
  uint32_t bits = float_to_bits(x);
  const uint16_t sign = uint16_t((bits >> 16) & 0x8000u);
  bits &= 0x7fffffffu;
  if (bits > 0x7f800000u) {  // nan
    out->bits = sign | 0x7e00u;
    return;
  }
  if (bits >= 0x477ff000u) {  // rounds to >= 65520: inf
    out->bits = sign | 0x7c00u;
    return;
  }
  if (bits < 0x38800000u) {  // below the smallest normal half: subnormal or 0
    // Scale into the subnormal grid (units of 2^-24) and round to nearest even
    // by letting the float adder do it.
    const float magnitude = bits_to_float(bits);
    const float scaled = magnitude * 16777216.0f + 12582912.0f;  // 1.5*2^23
    const uint32_t rounded = float_to_bits(scaled) - float_to_bits(12582912.0f);
    out->bits = sign | uint16_t(rounded);
    return;
  }
  // normal: rebias exponent (127 -> 15) and round the 13 dropped bits.
  uint32_t half = bits - (112u << 23);
  half += 0xfffu + ((half >> 13) & 1u);
  out->bits = sign | uint16_t(half >> 13);
}

template <typename Fn>
void dispatch_element_type(ElementType type, Fn&& fn) {
  switch (type) {
    case ElementType::kF32: return fn(float{});
    case ElementType::kBF16: return fn(bf16_t{});
    case ElementType::kF16: return fn(f16_t{});
  }
}

}  // namespace fastattn
