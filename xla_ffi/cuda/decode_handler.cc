// Thin FFI handler: decode and check buffers, then enqueue cuda::decode_attention
// on XLA's stream (no synchronisation).
#include <cuda_runtime.h>

#include "../common/check.h"
#include "../common/ffi_decode.h"
#include "decode.h"
#include "handlers.h"

namespace fastattn {
namespace cuda {
namespace {

ffi::Error decode_cuda(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                       ffi::AnyBuffer lengths, ffi::AnyBuffer page_table,
                       ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> lse,
                       ffi::Result<ffi::AnyBuffer> workspace, float softmax_scale,
                       int64_t num_splits) {
  DecodeParams params;
  if (auto e = decode_decode_args(q, k, v, lengths, page_table, *out, *lse, &params); e.failure())
    return e;
  params.softmax_scale = softmax_scale;
  FFI_CHECK(num_splits >= 1, "num_splits must be >= 1, got " << num_splits);
  FFI_CHECK(decode_supported(params),
            "the CUDA decode kernel needs head_dim <= 256 with rows of whole 16-byte vectors "
            "(D % 8 == 0 for bf16/f16, D % 4 == 0 for f32); got D=" << params.head_dim);
  const int64_t floats = decode_workspace_floats(params, num_splits);
  FFI_CHECK(workspace->element_type() == ffi::DataType::F32 &&
                int64_t(workspace->element_count()) >= floats,
            "workspace must be float32 with at least " << floats << " elements");
  const cudaError_t status = decode_attention(
      params, num_splits, static_cast<float*>(workspace->untyped_data()), stream);
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
                                  .Attr<int64_t>("num_splits"));

}  // namespace cuda
}  // namespace fastattn
