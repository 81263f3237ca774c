// The one place per operation that picks the kernel family of a CUDA
// attention call, the sm90 wgmma kernels or the sm80 mma.sync ones, from
// the call's KernelChoice (an FFI attribute, see kernel_choice.h) and the
// device, and enqueues it. The handlers and the standalone bench call these;
// no launcher of one family calls into the other.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "../common/attention_params.h"
#include "kernel_choice.h"

namespace fastattn {
namespace cuda {

// What came of a dispatch: `refused` names the option and why, where an
// explicit choice cannot run the call (nothing was enqueued); else `launch`
// is the CUDA status of the launches.
struct DispatchStatus {
  std::string refused;
  cudaError_t launch = cudaSuccess;
  bool ok() const { return refused.empty() && launch == cudaSuccess; }
};

// The kernel family `choice` runs a call with, or why it cannot (then
// `*kernel` is untouched). The wgmma forward takes head_dim 64/128, the
// wgmma backward also no d_bias; both need device_runs_wgmma().
std::string select_forward_kernel(const ForwardParams& params, KernelChoice choice,
                                  Kernel* kernel);
std::string select_backward_kernel(const BackwardParams& params, KernelChoice choice,
                                   Kernel* kernel);

// Enqueues the forward of the selected family on `stream`, no
// synchronisation. `work_counter`: one int32 the wgmma kernel schedules its
// work on (attention.h).
DispatchStatus attention_forward(const ForwardParams& params, KernelChoice choice,
                                 int32_t* work_counter, cudaStream_t stream);

// Enqueues the delta rows into `delta` ([B, Hq, Sq] float32), then the
// gradients of the selected family, on `stream`, no synchronisation.
// dq_accum / dq_turns: the one-pass wgmma backward's dQ workspace
// (attention_backward.h), or null (then a request for it is refused).
DispatchStatus attention_backward(const BackwardParams& params, KernelChoice choice,
                                  float* delta, float* dq_accum, int32_t* dq_turns,
                                  cudaStream_t stream);

}  // namespace cuda
}  // namespace fastattn
