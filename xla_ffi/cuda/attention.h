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

// The launches, no synchronisation; dispatch.cc picks one per call.
// The mma.sync kernels (attention_sm80.cu): every supported call on sm80+.
cudaError_t attention_forward_mma_sync(const ForwardParams& params, cudaStream_t stream);

// The wgmma kernel (attention_sm90.cu): head_dim 64 or 128 where
// device_runs_wgmma(). `work_counter`: one int32 of device memory, which its
// CTAs take their work items from (zeroed on `stream` first; the custom call
// passes an output of its own, alive until the kernel ran).
cudaError_t attention_forward_wgmma(const ForwardParams& params, int32_t* work_counter,
                                    cudaStream_t stream);

// True when the current device is compute capability 9.0 and this build
// holds sm_90a code (FASTATTN_CUDA_ARCHS has 90a); defined in
// attention_sm90.cu, cached per device.
bool device_runs_wgmma();

}  // namespace cuda
}  // namespace fastattn
