#include "dispatch.h"

#include "attention.h"
#include "attention_backward.h"

namespace fastattn {
namespace cuda {

std::string select_forward_kernel(const ForwardParams& params, KernelChoice choice,
                                  Kernel* kernel) {
  return choose_kernel("cuda_forward", choice,
                       wgmma_obstacle(params.shape.head_dim, false, device_runs_wgmma()), kernel);
}

std::string select_backward_kernel(const BackwardParams& params, KernelChoice choice,
                                   Kernel* kernel) {
  return choose_kernel(
      "cuda_backward", choice,
      wgmma_obstacle(params.shape.head_dim, params.d_bias != nullptr, device_runs_wgmma()),
      kernel);
}

DispatchStatus attention_forward(const ForwardParams& params, KernelChoice choice,
                                 int32_t* work_counter, cudaStream_t stream) {
  DispatchStatus status;
  Kernel kernel;
  status.refused = select_forward_kernel(params, choice, &kernel);
  if (!status.refused.empty()) return status;
  status.launch = kernel == Kernel::kWgmma
                      ? attention_forward_wgmma(params, work_counter, stream)
                      : attention_forward_mma_sync(params, stream);
  return status;
}

DispatchStatus attention_backward(const BackwardParams& params, KernelChoice choice,
                                  float* delta, float* dq_accum, int32_t* dq_turns,
                                  cudaStream_t stream) {
  DispatchStatus status;
  Kernel kernel;
  status.refused = select_backward_kernel(params, choice, &kernel);
  if (!status.refused.empty()) return status;
  BackwardDq dq = BackwardDq::kSeparatePass;
  if (kernel == Kernel::kWgmma) {
    status.refused = choose_backward_dq(choice, dq_accum != nullptr && dq_turns != nullptr, &dq);
    if (!status.refused.empty()) return status;
  }
  status.launch = attention_backward_delta(params, delta, stream);
  if (status.launch != cudaSuccess) return status;
  status.launch = kernel == Kernel::kWgmma
                      ? attention_backward_wgmma(params, delta, dq, dq_accum, dq_turns, stream)
                      : attention_backward_mma_sync(params, delta, stream);
  return status;
}

}  // namespace cuda
}  // namespace fastattn
