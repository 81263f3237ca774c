// Runtime choice of the CPU kernels' instruction-set level. The kernels are
// compiled once per level (isa_namespace.h); this file, the handlers and
// dispatch.cc are compiled for plain x86-64 and pick a level's table of
// function pointers from cpuid, the OS's saved-state mask (XCR0) and, for
// AMX, Linux's permission to use the tile registers.
#pragma once

#include <cstdint>
#include <string>

#include "../common/attention_params.h"
#include "../common/decode_params.h"

namespace fastattn {
namespace cpu {

// KernelConfig.cpu_isa (jax_fastattn/config.py) as the int32 FFI attribute
// "cpu_isa"; jax_fastattn/ffi.py KERNEL_CODES holds the same numbers.
// kBaseline is the one level of a build for a non-x86 target.
enum class CpuIsa : int32_t {
  kAuto = 0,
  kAvx2 = 1,        // AVX2 + FMA + F16C (x86-64-v3)
  kAvx512 = 2,      // AVX-512 F/BW/CD/DQ/VL (x86-64-v4)
  kAvx512Bf16 = 3,  // + AVX512-BF16 (vdpbf16ps)
  kAmx = 4,         // + AMX-TILE, AMX-BF16 (TDPBF16PS)
  kBaseline = 5,
};
constexpr int kNumCpuIsa = 6;

const char* cpu_isa_name(CpuIsa isa);

// One level's kernels.
struct CpuKernels {
  CpuIsa isa;
  void (*forward)(const ForwardParams&);
  void (*backward)(const BackwardParams&);
  void (*decode)(const DecodeParams&);
};

// Bit (1 << level) set for every level this CPU and OS can run.
uint32_t supported_isa_mask();
// Bit (1 << level) set for every level compiled into this library.
uint32_t compiled_isa_mask();
// The level "auto" picks: the highest one both supported and compiled, or
// kAuto when there is none.
CpuIsa auto_isa(uint32_t supported, uint32_t compiled);

// Why `requested` (a CpuIsa code) cannot run given the two masks, or ""
// when it can. A pure function, so tests can ask about CPUs they lack.
std::string isa_obstacle(int32_t requested, uint32_t supported, uint32_t compiled);

// The kernels of `requested` (kAuto: auto_isa), or null with *error set.
const CpuKernels* select_kernels(int32_t requested, std::string* error);

}  // namespace cpu
}  // namespace fastattn
