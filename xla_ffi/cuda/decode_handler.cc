// Thin FFI handler: decode and check buffers, then enqueue the decode kernel
// the cuda_decode attribute names (1 simt: decode_attention; 2 mma_sync:
// decode_attention_mma; 0 auto: mma_sync where it can take the call, else
// simt) on XLA's stream (no synchronisation).
#include <cuda_runtime.h>

#include "../common/check.h"
#include "../common/ffi_decode.h"
#include "decode.h"
#include "handlers.h"
#include "kernel_choice.h"

namespace fastattn {
namespace cuda {
namespace {

ffi::Error decode_cuda(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                       ffi::AnyBuffer lengths, ffi::AnyBuffer page_table,
                       ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> lse,
                       ffi::Result<ffi::AnyBuffer> workspace, float softmax_scale,
                       int64_t num_splits, int32_t cuda_decode) {
  DecodeParams params;
  if (auto e = decode_decode_args(q, k, v, lengths, page_table, *out, *lse, &params); e.failure())
    return e;
  params.softmax_scale = softmax_scale;
  FFI_CHECK(num_splits >= 1, "num_splits must be >= 1, got " << num_splits);
  FFI_CHECK(decode_supported(params),
            "the CUDA decode kernel needs head_dim <= 256 with rows of whole 16-byte vectors "
            "(D % 8 == 0 for bf16/f16, D % 4 == 0 for f32); got D=" << params.head_dim);
  const auto kernel = static_cast<DecodeKernel>(cuda_decode);
  FFI_CHECK(kernel == DecodeKernel::kAuto || kernel == DecodeKernel::kSimt ||
                kernel == DecodeKernel::kMmaSync,
            "KernelConfig.cuda_decode: no kernel with code " << cuda_decode);
  // The tensor-core kernel reads the cache at 92-100 % of a device copy's rate
  // where the CUDA-core one reaches 72-87 % (H100, GQA 32/8, D 128, bf16).
  const bool mma = kernel == DecodeKernel::kMmaSync ||
                   (kernel == DecodeKernel::kAuto && decode_mma_supported(params));
  FFI_CHECK(kernel != DecodeKernel::kMmaSync || decode_mma_supported(params),
            "KernelConfig.cuda_decode='mma_sync' needs bf16/f16, head_dim 64 or 128 and at most 16 q "
            "heads per kv head");
  const int64_t floats = decode_workspace_floats(params, num_splits);
  FFI_CHECK(workspace->element_type() == ffi::DataType::F32 &&
                int64_t(workspace->element_count()) >= floats,
            "workspace must be float32 with at least " << floats << " elements");
  float* partials = static_cast<float*>(workspace->untyped_data());
  const cudaError_t status = mma ? decode_attention_mma(params, num_splits, partials, stream)
                                 : decode_attention(params, num_splits, partials, stream);
  if (status != cudaSuccess) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("jax_fastattn: decode kernel launch failed: ") + cudaGetErrorString(status));
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FastattnDecodeCuda, decode_cuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k cache or pages
                                  .Arg<ffi::AnyBuffer>()  // v cache or pages
                                  .Arg<ffi::AnyBuffer>()  // lengths
                                  .Arg<ffi::AnyBuffer>()  // page_table (empty: contiguous)
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Ret<ffi::AnyBuffer>()  // lse
                                  .Ret<ffi::AnyBuffer>()  // workspace
                                  .Attr<float>("softmax_scale")
                                  .Attr<int64_t>("num_splits")
                                  .Attr<int32_t>("cuda_decode"));

}  // namespace cuda
}  // namespace fastattn
