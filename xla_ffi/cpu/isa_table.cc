// This level's table of kernels (compiled once per level, like the kernels).
#include "decode.h"
#include "dispatch.h"
#include "flash_backward.h"
#include "flash_forward.h"
#include "isa_namespace.h"

namespace fastattn {
namespace cpu {
inline namespace FASTATTN_ISA_NS {

namespace {

// The level these flags compiled for, from the compiler's own macros, so a
// FASTATTN_CPU_ARCH build (e.g. -march=native) reports what it really is.
constexpr CpuIsa compiled_isa() {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
  return CpuIsa::kAmx;
#elif defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  return CpuIsa::kAvx512Bf16;
#elif defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__) && defined(__AVX512CD__)
  return CpuIsa::kAvx512;
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  return CpuIsa::kAvx2;
#else
  return CpuIsa::kBaseline;
#endif
}

}  // namespace

const CpuKernels& kernel_table() {
  static const CpuKernels table{compiled_isa(), &flash_forward, &flash_backward,
                                &decode_attention};
  return table;
}

}  // namespace FASTATTN_ISA_NS
}  // namespace cpu
}  // namespace fastattn
