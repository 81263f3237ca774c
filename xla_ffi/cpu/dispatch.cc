#include "dispatch.h"

#include <algorithm>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace fastattn {
namespace cpu {

// Each level's table (isa_table.cc, compiled per level). A multi-level build
// (setup.py's default) defines FASTATTN_CPU_MULTI_LEVEL and links the four
// x86 levels; any other build has the one level its flags chose.
#if defined(FASTATTN_CPU_MULTI_LEVEL)
namespace isa_avx2 { const CpuKernels& kernel_table(); }
namespace isa_avx512 { const CpuKernels& kernel_table(); }
namespace isa_avx512_bf16 { const CpuKernels& kernel_table(); }
namespace isa_amx { const CpuKernels& kernel_table(); }
#else
namespace isa_native { const CpuKernels& kernel_table(); }
#endif

namespace {

struct CompiledTables {
  const CpuKernels* by_level[kNumCpuIsa] = {};
  CompiledTables() {
#if defined(FASTATTN_CPU_MULTI_LEVEL)
    for (const CpuKernels* table : {&isa_avx2::kernel_table(), &isa_avx512::kernel_table(),
                                    &isa_avx512_bf16::kernel_table(), &isa_amx::kernel_table()}) {
      by_level[int(table->isa)] = table;
    }
#else
    by_level[int(isa_native::kernel_table().isa)] = &isa_native::kernel_table();
#endif
  }
};

const CpuKernels* const* compiled_tables() {
  static const CompiledTables tables;
  return tables.by_level;
}

#if defined(__x86_64__) || defined(__i386__)
struct CpuidRegs {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
};

CpuidRegs cpuid(unsigned leaf, unsigned subleaf) {
  CpuidRegs r;
  if (!__get_cpuid_count(leaf, subleaf, &r.eax, &r.ebx, &r.ecx, &r.edx)) return CpuidRegs{};
  return r;
}

bool bit(unsigned reg, int index) { return (reg >> index) & 1u; }

// The state components the OS saves on a context switch (XCR0); a feature
// whose registers the OS does not save must not be used.
uint64_t xcr0() {
  unsigned eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t(edx) << 32) | eax;
}

// Linux (5.16+) hands out the AMX tile data state only on request, per
// process (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA).
bool amx_permitted() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr long kRequestPermission = 0x1023, kTileData = 18;
  return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
#else
  return false;
#endif
}

uint32_t detect_x86() {
  const CpuidRegs leaf1 = cpuid(1, 0);
  if (!bit(leaf1.ecx, 27)) return 0;  // no OSXSAVE: no AVX state at all
  const uint64_t os_state = xcr0();
  const bool os_avx = (os_state & 0x6) == 0x6;            // SSE, AVX
  const bool os_avx512 = os_avx && (os_state & 0xe0) == 0xe0;  // opmask, ZMM
  const bool os_amx = (os_state & 0x60000) == 0x60000;    // XTILECFG, XTILEDATA
  const CpuidRegs leaf7 = cpuid(7, 0), leaf7_1 = cpuid(7, 1);
  const CpuidRegs ext1 = cpuid(0x80000001u, 0);
  uint32_t mask = 0;
  const bool avx2 = os_avx && bit(leaf1.ecx, 28) /*AVX*/ && bit(leaf1.ecx, 12) /*FMA*/ &&
                    bit(leaf1.ecx, 29) /*F16C*/ && bit(leaf1.ecx, 22) /*MOVBE*/ &&
                    bit(leaf7.ebx, 5) /*AVX2*/ && bit(leaf7.ebx, 3) /*BMI1*/ &&
                    bit(leaf7.ebx, 8) /*BMI2*/ && bit(ext1.ecx, 5) /*LZCNT*/;
  if (!avx2) return 0;
  mask |= 1u << int(CpuIsa::kAvx2);
  const bool avx512 = os_avx512 && bit(leaf7.ebx, 16) /*F*/ && bit(leaf7.ebx, 17) /*DQ*/ &&
                      bit(leaf7.ebx, 28) /*CD*/ && bit(leaf7.ebx, 30) /*BW*/ &&
                      bit(leaf7.ebx, 31) /*VL*/;
  if (!avx512) return mask;
  mask |= 1u << int(CpuIsa::kAvx512);
  if (!bit(leaf7_1.eax, 5)) return mask;  // AVX512-BF16
  mask |= 1u << int(CpuIsa::kAvx512Bf16);
  const bool amx = os_amx && bit(leaf7.edx, 24) /*AMX-TILE*/ && bit(leaf7.edx, 22) /*AMX-BF16*/;
  if (amx && amx_permitted()) mask |= 1u << int(CpuIsa::kAmx);
  return mask;
}
#endif

std::string level_list(uint32_t mask) {
  std::string names;
  for (int level = 1; level < kNumCpuIsa; ++level) {
    if (mask & (1u << level)) names += (names.empty() ? "" : ", ") + std::string(cpu_isa_name(CpuIsa(level)));
  }
  return names.empty() ? "none" : names;
}

}  // namespace

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAuto: return "auto";
    case CpuIsa::kAvx2: return "avx2";
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx512Bf16: return "avx512_bf16";
    case CpuIsa::kAmx: return "amx";
    case CpuIsa::kBaseline: return "baseline";
  }
  return "?";
}

uint32_t compiled_isa_mask() {
  uint32_t mask = 0;
  for (int level = 1; level < kNumCpuIsa; ++level) {
    if (compiled_tables()[level] != nullptr) mask |= 1u << level;
  }
  return mask;
}

uint32_t supported_isa_mask() {
  static const uint32_t mask = [] {
#if defined(__x86_64__) || defined(__i386__)
    return detect_x86();
#else
    return 1u << int(CpuIsa::kBaseline);  // a non-x86 build's only level
#endif
  }();
  return mask;
}

CpuIsa auto_isa(uint32_t supported, uint32_t compiled) {
  for (int level = kNumCpuIsa - 1; level >= 1; --level) {
    if (supported & compiled & (1u << level)) return CpuIsa(level);
  }
  // A single-level build for another target (kBaseline) runs where it was built.
  if (compiled & (1u << int(CpuIsa::kBaseline))) return CpuIsa::kBaseline;
  return CpuIsa::kAuto;
}

std::string isa_obstacle(int32_t requested, uint32_t supported, uint32_t compiled) {
  if (requested < 0 || requested > int(CpuIsa::kAmx)) {
    return "cpu_isa code " + std::to_string(requested) +
           " is not one of auto, avx2, avx512, avx512_bf16, amx (codes 0-4)";
  }
  if (requested == int(CpuIsa::kAuto)) {
    if (auto_isa(supported, compiled) != CpuIsa::kAuto) return "";
    return "cpu_isa='auto': this CPU supports none of the levels this library was "
           "built for (" + level_list(compiled) + "); the lowest, avx2, needs AVX2, FMA and F16C";
  }
  const std::string name = cpu_isa_name(CpuIsa(requested));
  if (!(supported & (1u << requested))) {
    return "cpu_isa='" + name + "' needs instructions this CPU (or its OS) lacks; "
           "this CPU supports: " + level_list(supported);
  }
  if (!(compiled & (1u << requested))) {
    return "cpu_isa='" + name + "' is not compiled into this build (built for: " +
           level_list(compiled) + "; FASTATTN_CPU_ARCH builds have one level only)";
  }
  return "";
}

const CpuKernels* select_kernels(int32_t requested, std::string* error) {
  const uint32_t supported = supported_isa_mask(), compiled = compiled_isa_mask();
  *error = isa_obstacle(requested, supported, compiled);
  if (!error->empty()) return nullptr;
  const CpuIsa level =
      requested == int(CpuIsa::kAuto) ? auto_isa(supported, compiled) : CpuIsa(requested);
  return compiled_tables()[int(level)];
}

}  // namespace cpu
}  // namespace fastattn

// For jax_fastattn.ffi.cpu_isa_levels() (through ctypes, a plain C ABI):
// the supported and compiled level masks and the level "auto" picks.
extern "C" __attribute__((visibility("default"))) void fastattn_cpu_isa_info(
    uint32_t* supported, uint32_t* compiled, int32_t* auto_level) {
  using namespace fastattn::cpu;
  *supported = supported_isa_mask();
  *compiled = compiled_isa_mask();
  *auto_level = int32_t(auto_isa(*supported, *compiled));
}

// isa_obstacle for tests: writes the message (NUL-terminated, truncated to
// `capacity`) and returns its length, 0 when the level can run.
extern "C" __attribute__((visibility("default"))) int fastattn_cpu_isa_obstacle(
    int32_t requested, uint32_t supported, uint32_t compiled, char* message, int capacity) {
  const std::string text = fastattn::cpu::isa_obstacle(requested, supported, compiled);
  if (capacity > 0) {
    const size_t n = std::min<size_t>(text.size(), size_t(capacity - 1));
    text.copy(message, n);
    message[n] = '\0';
  }
  return int(text.size());
}
