// Prints what kernel_choice.h decides for every combination of choice code,
// head dim, bias gradient and device, one line each:
//   <option> <code> <head_dim> <has_d_bias> <device_runs_wgmma> -> wgmma|mma_sync|error: <text>
// then, for the backward's wgmma codes, how dQ is made with and without the
// dQ workspace:
//   dq <code> <has_workspace> -> fused_ordered|fused_atomic|separate_pass|error: <text>
// tests/test_kernel_config.py compiles it (plain C++, no CUDA) and checks the
// lines against rules it writes down independently.
#include <cstdio>

#include "cuda/kernel_choice.h"

int main() {
  using fastattn::cuda::Kernel;
  using fastattn::cuda::KernelChoice;
  for (const char* option : {"cuda_forward", "cuda_backward"}) {
    for (int code : {0, 1, 2, 3, 4, 7}) {
      for (int head_dim : {32, 64, 128, 256}) {
        for (bool has_d_bias : {false, true}) {
          // A forward call has no bias gradient (dispatch.cc passes false).
          if (has_d_bias && std::string(option) == "cuda_forward") continue;
          for (bool device : {false, true}) {
            Kernel kernel = Kernel::kMmaSync;
            const std::string error = fastattn::cuda::choose_kernel(
                option, static_cast<KernelChoice>(code),
                fastattn::cuda::wgmma_obstacle(head_dim, has_d_bias, device), &kernel);
            std::printf("%s %d %d %d %d -> %s%s\n", option, code, head_dim, int(has_d_bias),
                        int(device),
                        error.empty() ? (kernel == Kernel::kWgmma ? "wgmma" : "mma_sync")
                                      : "error: ",
                        error.c_str());
          }
        }
      }
    }
  }
  for (int code : {0, 1, 3, 4}) {
    for (bool has_workspace : {false, true}) {
      fastattn::cuda::BackwardDq dq = fastattn::cuda::BackwardDq::kSeparatePass;
      const std::string error = fastattn::cuda::choose_backward_dq(
          static_cast<KernelChoice>(code), has_workspace, &dq);
      const char* names[] = {"fused_ordered", "fused_atomic", "separate_pass"};  // BackwardDq order
      std::printf("dq %d %d -> %s%s\n", code, int(has_workspace),
                  error.empty() ? names[static_cast<int>(dq)] : "error: ", error.c_str());
    }
  }
  return 0;
}
