// Thin FFI handler: decode and check buffers, then enqueue the kernel the
// cuda_forward attribute selects (dispatch.h) on XLA's stream (no
// synchronisation).
#include <cuda_runtime.h>

#include "../common/check.h"
#include "../common/ffi_decode.h"
#include "attention.h"
#include "dispatch.h"
#include "handlers.h"

namespace fastattn {
namespace cuda {
namespace {

ffi::Error forward_cuda(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                        ffi::AnyBuffer bias, ffi::AnyBuffer q_segment, ffi::AnyBuffer kv_segment,
                        ffi::AnyBuffer dense, ffi::AnyBuffer tile_class,
                        ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> lse,
                        float softmax_scale, int64_t band_lo, int64_t band_hi, int64_t tile_q,
                        int64_t tile_kv, ffi::Result<ffi::AnyBuffer> work_counter,
                        KernelChoice cuda_forward) {
  ForwardParams params;
  if (auto e = decode_forward_args(q, k, v, bias, q_segment, kv_segment, dense, tile_class, *out,
                                   *lse, softmax_scale, band_lo, band_hi, tile_q, tile_kv,
                                   &params);
      e.failure())
    return e;
  FFI_CHECK(forward_supported(params),
            "the CUDA attention kernel takes bfloat16/float16 with head_dim 64, 128 or 256 "
            "(flash_attention pads smaller head dims) and plan tiles 64x64; got head_dim "
                << params.shape.head_dim << ", tiles " << tile_q << "x" << tile_kv);
  FFI_CHECK(params.shape.batch <= 65535 && params.shape.q_heads <= 65535,
            "batch and q heads must be <= 65535 (grid limits)");
  FFI_CHECK(work_counter->element_type() == ffi::DataType::S32 &&
                work_counter->element_count() >= 1,
            "the work counter output must be int32 with at least one element");
  const DispatchStatus status = attention_forward(
      params, cuda_forward, static_cast<int32_t*>(work_counter->untyped_data()), stream);
  FFI_CHECK(status.refused.empty(), status.refused);
  if (status.launch != cudaSuccess) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("jax_fastattn: attention kernel launch failed: ") +
                          cudaGetErrorString(status.launch));
  }
  return ffi::Error::Success();
}

}  // namespace

// The wgmma kernel's work counter is an output after out and lse (XLA keeps
// an output alive until the kernel ran; FFI scratch would be freed too early);
// cuda_forward is KernelConfig.cuda_forward's code (kernel_choice.h).
XLA_FFI_DEFINE_HANDLER_SYMBOL(FastattnForwardCuda, forward_cuda,
                              bind_forward_args(
                                  ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>())
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<KernelChoice>("cuda_forward"));

}  // namespace cuda
}  // namespace fastattn
