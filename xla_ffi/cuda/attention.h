// Fused attention forward on sm80+ (mma.sync m16n8k16, ldmatrix, cp.async).
#pragma once

#include <cuda_runtime.h>

#include "../common/attention_params.h"

namespace fastattn {
namespace cuda {

// Tiles of the forward kernel: 4 warps x 16 query rows, 64 keys per step.
// The mask plan's tile classes must be computed with these sizes.
constexpr int kForwardTileQ = 64;
constexpr int kForwardTileKv = 64;

// True if the kernel runs this call: bfloat16/float16, head_dim 64, 128 or
// 256, plan tiles 64 x 64.
bool forward_supported(const ForwardParams& params);

// Enqueues the forward kernel on `stream`; no synchronisation.
cudaError_t attention_forward(const ForwardParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastattn
