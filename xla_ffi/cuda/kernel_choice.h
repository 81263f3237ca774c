// Kernel choices of the CUDA custom calls: KernelConfig.cuda_forward,
// cuda_backward, cuda_decode and volta_layout (jax_fastattn/config.py) arrive as int32
// FFI attributes of the same names, with the codes of the enums below
// (jax_fastattn/ffi.py KERNEL_CODES holds the same numbers). Plain C++, no
// CUDA: the choice is a pure function of the call and the device.
#pragma once

#include <cstdint>
#include <string>

namespace fastattn {
namespace cuda {

enum class KernelChoice : int32_t {
  kAuto = 0,     // wgmma where it can run the call (the backward: kWgmmaOrdered's
                 // kernel where it has the dQ workspace), else mma.sync
  kWgmma = 1,    // the sm90 wgmma kernels; an error where they cannot run
  kMmaSync = 2,  // the sm80 mma.sync kernels (they run on sm80 and later)
  // Backward only, the one-pass wgmma backward (kWgmma: dK/dV, then dQ in
  // a second kernel), with dQ summed through a float32 workspace:
  kWgmmaOrdered = 3,  // in a fixed order (bitwise reproducible)
  kWgmmaAtomic = 4,   // by float adds in any order
};

// How the wgmma backward produces dQ.
enum class BackwardDq : int32_t {
  kFusedOrdered = 0,  // in the dK/dV kernel, added in a fixed order (reproducible)
  kFusedAtomic = 1,   // in the dK/dV kernel, atomics in any order
  kSeparatePass = 2,  // a second kernel over q blocks
};

// The decode kernel (decode_attention): the CUDA-core split kernel or the
// tensor-core one (decode_mma_sm80.cu).
enum class DecodeKernel : int32_t {
  kAuto = 0,     // the tensor-core kernel where it can take the call, else the CUDA-core one
  kSimt = 1,     // the CUDA-core kernel (decode_sm80.cu)
  kMmaSync = 2,  // the tensor-core kernel; an error where it cannot take the call
};

// Shared-memory operand layout of the Volta kernel (sm70/): FastAttention's
// bank-conflict-free swizzle, or plain row-major (the ablation).
enum class VoltaLayout : int32_t { kSwizzled = 0, kNaive = 1 };

// The kernel family that runs a call.
enum class Kernel { kWgmma, kMmaSync };

// Why the wgmma kernels cannot run a call; empty if they can. They exist for
// head_dim 64 and 128 on a compute capability 9.0 device with sm_90a code
// in this build; the backward ones have no bias gradient.
inline std::string wgmma_obstacle(int64_t head_dim, bool has_d_bias, bool device_runs_wgmma) {
  if (head_dim != 64 && head_dim != 128) {
    return "the wgmma kernels take head_dim 64 or 128, got " + std::to_string(head_dim);
  }
  if (has_d_bias) return "the wgmma backward has no bias gradient (this call computes one)";
  if (!device_runs_wgmma) {
    return "the device is not compute capability 9.0 (H100/H200) or this build has no sm_90a "
           "code (FASTATTN_CUDA_ARCHS without 90a)";
  }
  return "";
}

// The KernelConfig value of a wgmma choice (kWgmma, kWgmmaOrdered,
// kWgmmaAtomic), for error messages.
inline const char* wgmma_choice_name(KernelChoice choice) {
  return choice == KernelChoice::kWgmma          ? "wgmma"
         : choice == KernelChoice::kWgmmaOrdered ? "wgmma_ordered"
                                                 : "wgmma_atomic";
}

// Resolves `choice`, the value of the attribute `option` ("cuda_forward" or
// "cuda_backward"), into `*kernel`. Returns an empty string, or the error
// for an explicit request that cannot be honoured (never a silent fallback)
// or for an unknown code.
inline std::string choose_kernel(const char* option, KernelChoice choice,
                                 const std::string& wgmma_obstacle, Kernel* kernel) {
  const std::string name = std::string("KernelConfig.") + option;
  switch (choice) {
    case KernelChoice::kAuto:
      *kernel = wgmma_obstacle.empty() ? Kernel::kWgmma : Kernel::kMmaSync;
      return "";
    case KernelChoice::kMmaSync:
      *kernel = Kernel::kMmaSync;
      return "";
    case KernelChoice::kWgmma:
    case KernelChoice::kWgmmaOrdered:
    case KernelChoice::kWgmmaAtomic: {
      const bool backward_only = choice != KernelChoice::kWgmma;
      if (backward_only && std::string(option) != "cuda_backward") break;
      if (!wgmma_obstacle.empty()) {
        return name + "='" + wgmma_choice_name(choice) + "' cannot run this call: " +
               wgmma_obstacle;
      }
      *kernel = Kernel::kWgmma;
      return "";
    }
  }
  return name + " has no kernel with code " + std::to_string(static_cast<int32_t>(choice)) +
         (std::string(option) == "cuda_backward"
              ? " (0 auto, 1 wgmma, 2 mma_sync, 3 wgmma_ordered, 4 wgmma_atomic)"
              : " (0 auto, 1 wgmma, 2 mma_sync)");
}

// How a wgmma backward call produces dQ: `choice` resolved into the dQ
// variant, or an error. "wgmma" takes the second pass; "auto" the ordered
// one-pass variant where the caller gave it the dQ workspace (it is
// reproducible too, and faster: 1.07-1.30x the two passes on an H100 at D
// 64/128, causal and full), else the second pass; the one-pass variants
// need the workspace.
inline std::string choose_backward_dq(KernelChoice choice, bool has_dq_workspace,
                                      BackwardDq* dq) {
  if (choice == KernelChoice::kWgmma || (choice == KernelChoice::kAuto && !has_dq_workspace)) {
    *dq = BackwardDq::kSeparatePass;
    return "";
  }
  if (choice == KernelChoice::kAuto) {
    *dq = BackwardDq::kFusedOrdered;
    return "";
  }
  if (!has_dq_workspace) {
    return std::string("KernelConfig.cuda_backward='") + wgmma_choice_name(choice) +
           "' needs the dQ workspace (dq_accum [B, Hq, q tiles * 64 * D] float32 and dq_turns "
           "[B, Hq, q tiles] int32), got empty ones";
  }
  *dq = choice == KernelChoice::kWgmmaAtomic ? BackwardDq::kFusedAtomic : BackwardDq::kFusedOrdered;
  return "";
}

}  // namespace cuda
}  // namespace fastattn
