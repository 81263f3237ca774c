// Loads the embedded compute_70 PTX of the Volta kernels with the CUDA
// driver API (the driver JIT-compiles it for the GPU at hand) and launches
// them. The driver functions come from cudaGetDriverEntryPointByVersion, so
// the extension does not link libcuda.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <string>

#include "../kernel_choice.h"
#include "volta_params.h"

namespace fastattn {
namespace volta {

// Enqueues the forward kernel for head_dim 64 or 128 on `stream`, from the
// PTX of `layout` (the swizzled kernel or the row-major ablation). Returns
// an empty string on success, else what failed.
std::string launch_forward(const VoltaForwardParams& params, long long batch, int head_dim,
                           cuda::VoltaLayout layout, cudaStream_t stream);

}  // namespace volta
}  // namespace fastattn
