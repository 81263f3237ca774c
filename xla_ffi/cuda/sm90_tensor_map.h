// Host side of the sm90a kernels: TMA tensor maps of [batch, len, heads, D]
// bf16/f16 arrays (whether the device runs the sm_90a kernels: attention.h).
// nvcc only (included by attention_sm90.cu and attention_backward_sm90.cu).
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include "../common/attention_params.h"

namespace fastattn {
namespace cuda {

// The cuTensorMapEncodeTiled driver entry point, looked up once (the
// runtime links no driver symbols).
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      fn = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

// Tensor map of a [batch, len, heads, dim] bf16/f16 array: boxes of 64
// columns x box_rows rows of one head, 128-byte swizzled (the sw128 layout
// of sm90_wgmma.h); rows past len read as zeros.
inline bool encode_tensor_map(CUtensorMap* map, const void* data, ElementType dtype,
                              int64_t batch, int64_t len, int64_t heads, int64_t dim,
                              int box_rows) {
  const auto encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  const cuuint64_t sizes[4] = {cuuint64_t(dim), cuuint64_t(heads), cuuint64_t(len),
                               cuuint64_t(batch)};
  const cuuint64_t strides[3] = {cuuint64_t(dim * 2), cuuint64_t(heads * dim * 2),
                                 cuuint64_t(len * heads * dim * 2)};
  const cuuint32_t box[4] = {64, 1, cuuint32_t(box_rows), 1}, steps[4] = {1, 1, 1, 1};
  return encode(map,
                dtype == ElementType::kBF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                            : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                4, const_cast<void*>(data), sizes, strides, box, steps,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace cuda
}  // namespace fastattn
