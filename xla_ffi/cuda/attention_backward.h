// Fused attention backward on sm80+ (mma.sync m16n8k16, ldmatrix, cp.async):
// dQ, dK, dV and dBias, deterministic (no atomics: every output element is
// summed by one thread in a fixed order).
#pragma once

#include <cuda_runtime.h>

#include "../common/attention_params.h"

namespace fastattn {
namespace cuda {

// The backward kernels walk the same 64 x 64 tile plan as the forward one.
constexpr int kBackwardTileQ = 64;
constexpr int kBackwardTileKv = 64;

// True if the kernels run this call: bfloat16/float16, head_dim 64 or 128,
// plan tiles 64 x 64.
bool backward_supported(const BackwardParams& params);

// Enqueues the backward kernels on `stream`, no synchronisation:
//   delta[b, h, i] = sum_d dO * O - dlse            (workspace, [B, Hq, Sq] f32)
//   dK, dV: one CTA per 64 keys of a kv head, over all q heads of its group
//   dQ:     one CTA per 64 queries of a q head
// d_bias (when present) is cleared first, then written in visible tiles.
// On an sm_90 device with sm_90a code built in, the dK/dV and dQ passes run
// the wgmma kernels of attention_backward_sm90.cu (head dims 64 and 128, no
// dBias); FASTATTN_CUDA_BACKWARD=mma_sync in the environment forces the
// mma.sync ones.
cudaError_t attention_backward(const BackwardParams& params, float* delta, cudaStream_t stream);

// The wgmma passes (attention_backward_sm90.cu): whether this call takes
// them, and their launch (after the delta rows are enqueued).
bool backward_wgmma_selected(const BackwardParams& params);
cudaError_t attention_backward_wgmma(const BackwardParams& params, const float* delta,
                                     cudaStream_t stream);

}  // namespace cuda
}  // namespace fastattn
