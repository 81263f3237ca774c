// Fused attention backward on sm80+ (mma.sync m16n8k16, ldmatrix, cp.async):
// dQ, dK, dV and dBias, deterministic (no atomics: every output element is
// summed by one thread in a fixed order).
#pragma once

#include <cuda_runtime.h>

#include "../common/attention_params.h"
#include "kernel_choice.h"

namespace fastattn {
namespace cuda {

// The backward kernels walk the same 64 x 64 tile plan as the forward one.
constexpr int kBackwardTileQ = 64;
constexpr int kBackwardTileKv = 64;

// True if the kernels run this call: bfloat16/float16, head_dim 64 or 128,
// plan tiles 64 x 64.
bool backward_supported(const BackwardParams& params);

// The launches, no synchronisation; dispatch.cc runs the delta rows, then
// the dK/dV and dQ passes of one kernel family:
//   delta[b, h, i] = sum_d dO * O - dlse            (workspace, [B, Hq, Sq] f32)
//   dK, dV: one CTA per 64 keys of a kv head, over all q heads of its group
//   dQ:     one CTA per 64 queries of a q head
cudaError_t attention_backward_delta(const BackwardParams& params, float* delta,
                                     cudaStream_t stream);

// The mma.sync passes (attention_backward_sm80.cu): every supported call on
// sm80+. d_bias (when present) is cleared first, then written in visible
// tiles.
cudaError_t attention_backward_mma_sync(const BackwardParams& params, const float* delta,
                                        cudaStream_t stream);

// The wgmma backward (attention_backward_sm90.cu): head_dim 64 or 128, no
// d_bias, where device_runs_wgmma() (attention.h). `dq` picks how dQ is
// made; the fused variants take the workspace dq_accum (float32, 64 * D
// per q tile of each (batch, q head), in the kernel's own order) and
// dq_turns (int32 [B, Hq, q tiles]), both cleared or written here as they
// need.
cudaError_t attention_backward_wgmma(const BackwardParams& params, const float* delta,
                                     BackwardDq dq, float* dq_accum, int32_t* dq_turns,
                                     cudaStream_t stream);

}  // namespace cuda
}  // namespace fastattn
