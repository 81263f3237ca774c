// Split-KV (flash-decoding) attention on CUDA GPUs (sm80 and newer).
#pragma once

#include <cuda_runtime.h>

#include "../common/decode_params.h"

namespace fastattn {
namespace cuda {

// Rows of q heads one CTA serves: with GQA the q heads of a kv head share
// every K/V byte the CTA loads.
constexpr int kDecodeMaxHeadsPerCta = 8;

// Keys per split: the last one may be shorter. Splits are sized so that the
// grid has several CTAs per SM even for one sequence (B = 1).
int64_t decode_keys_per_split(const DecodeParams& params, int64_t num_splits);

// Workspace floats the launch needs: partial outputs and (max, sum) per
// (batch, q head, split).
int64_t decode_workspace_floats(const DecodeParams& params, int64_t num_splits);

// True if the kernels support this head dim and dtype (head_dim <= 256 and a
// row of K/V is a whole number of 16-byte vectors).
bool decode_supported(const DecodeParams& params);

// Enqueues both kernels on `stream`; no synchronisation. `workspace` holds
// decode_workspace_floats() floats of device memory.
cudaError_t decode_attention(const DecodeParams& params, int64_t num_splits, float* workspace,
                             cudaStream_t stream);

// True if the tensor-core kernel (decode_mma_sm80.cu) takes this call:
// bf16/f16, head_dim 64 or 128, at most 16 q heads per kv head.
bool decode_mma_supported(const DecodeParams& params);

// The same result through the tensor-core split kernel and the same merge;
// same workspace. cudaErrorInvalidValue if !decode_mma_supported(params).
cudaError_t decode_attention_mma(const DecodeParams& params, int64_t num_splits, float* workspace,
                                 cudaStream_t stream);

}  // namespace cuda
}  // namespace fastattn
