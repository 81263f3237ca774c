// Fused attention forward on sm80+ (mma.sync m16n8k16, ldmatrix, cp.async).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../common/attention_params.h"

namespace fastattn {
namespace cuda {

// Tiles of the mask plan the forward kernels read: 64 query rows x 64
// keys (the mma.sync kernels step 64 keys with 4 warps x 16 rows, or x 32
// rows covering two plan rows; the wgmma kernel steps 128 or 176 keys over
// 128 rows). The plan's tile classes must be computed with these sizes.
constexpr int kForwardTileQ = 64;
constexpr int kForwardTileKv = 64;

// Whether a forward call takes the kernels' band-only variants: the band
// mask alone, and softmax_scale > 0, since some of them fold the scale into
// their exp2s (see online_softmax_raw); the general variants take any
// scale.
inline bool forward_band_only(const ForwardParams& p) {
  return band_mask_only(p.mask, p.bias) && p.softmax_scale > 0.f;
}

// True if the kernel runs this call: bfloat16/float16, head_dim 64, 128 or
// 256, plan tiles 64 x 64.
bool forward_supported(const ForwardParams& params);

// Enqueues the forward kernel on `stream`; no synchronisation. On an sm_90
// device (H100, H200) with sm_90a code built in, head dims 64 and 128 run the
// wgmma kernel (attention_sm90.cu), the others the mma.sync one;
// FASTATTN_CUDA_FORWARD=mma_sync in the environment forces the latter.
// `work_counter`: one int32 of device memory, which the wgmma kernel's CTAs
// take their work items from (zeroed on `stream` first; the custom call
// passes an output of its own, alive until the kernel ran).
cudaError_t attention_forward(const ForwardParams& params, int32_t* work_counter,
                              cudaStream_t stream);

// The wgmma forward (attention_sm90.cu): whether this call takes it, and the
// launch itself (same tiles plan as the mma.sync kernel).
bool forward_wgmma_selected(const ForwardParams& params);
cudaError_t attention_forward_wgmma(const ForwardParams& params, int32_t* work_counter,
                                    cudaStream_t stream);

}  // namespace cuda
}  // namespace fastattn
