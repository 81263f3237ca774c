// Thin FFI handler: decode and check buffers, then enqueue the kernels the
// cuda_backward attribute selects (dispatch.h) on XLA's stream (no
// synchronisation).
#include <cuda_runtime.h>

#include "../common/check.h"
#include "../common/ffi_decode.h"
#include "attention_backward.h"
#include "dispatch.h"
#include "handlers.h"

namespace fastattn {
namespace cuda {
namespace {

ffi::Error backward_cuda(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k,
                         ffi::AnyBuffer v, ffi::AnyBuffer out, ffi::AnyBuffer lse,
                         ffi::AnyBuffer d_out, ffi::AnyBuffer d_lse, ffi::AnyBuffer bias,
                         ffi::AnyBuffer q_segment, ffi::AnyBuffer kv_segment,
                         ffi::AnyBuffer dense, ffi::AnyBuffer tile_class,
                         ffi::Result<ffi::AnyBuffer> d_q, ffi::Result<ffi::AnyBuffer> d_k,
                         ffi::Result<ffi::AnyBuffer> d_v, ffi::Result<ffi::AnyBuffer> d_bias,
                         float softmax_scale, int64_t band_lo, int64_t band_hi, int64_t tile_q,
                         int64_t tile_kv, ffi::Result<ffi::AnyBuffer> delta,
                         ffi::Result<ffi::AnyBuffer> dq_accum, ffi::Result<ffi::AnyBuffer> dq_turns,
                         KernelChoice cuda_backward) {
  BackwardParams params;
  if (auto e = decode_backward_args(q, k, v, out, lse, d_out, d_lse, bias, q_segment, kv_segment,
                                    dense, tile_class, *d_q, *d_k, *d_v, *d_bias, softmax_scale,
                                    band_lo, band_hi, tile_q, tile_kv, &params);
      e.failure())
    return e;
  const AttentionShape& s = params.shape;
  FFI_CHECK(backward_supported(params),
            "the CUDA attention backward takes bfloat16/float16 with head_dim 64 or 128 "
            "(flash_attention pads smaller head dims) and plan tiles 64x64; got head_dim "
                << s.head_dim << ", tiles " << tile_q << "x" << tile_kv);
  FFI_CHECK(s.batch <= 65535 && s.q_heads <= 65535,
            "batch and q heads must be <= 65535 (grid limits)");
  if (auto e = expect_shape(*delta, "delta workspace", {s.batch, s.q_heads, s.q_len},
                            ffi::DataType::F32);
      e.failure())
    return e;
  // The fused wgmma backward's dQ workspace, or empty buffers.
  const int64_t q_tiles = (s.q_len + kBackwardTileQ - 1) / kBackwardTileQ;
  const bool has_dq_workspace = dq_accum->element_count() > 0;
  if (auto e = expect_shape(*dq_accum, "dq_accum workspace",
                            {s.batch, s.q_heads, has_dq_workspace ? q_tiles * kBackwardTileQ * s.head_dim : 0},
                            ffi::DataType::F32);
      e.failure())
    return e;
  if (auto e = expect_shape(*dq_turns, "dq_turns workspace",
                            {s.batch, s.q_heads, has_dq_workspace ? q_tiles : 0}, ffi::DataType::S32);
      e.failure())
    return e;
  const DispatchStatus status = attention_backward(
      params, cuda_backward, static_cast<float*>(delta->untyped_data()),
      has_dq_workspace ? static_cast<float*>(dq_accum->untyped_data()) : nullptr,
      has_dq_workspace ? static_cast<int32_t*>(dq_turns->untyped_data()) : nullptr, stream);
  FFI_CHECK(status.refused.empty(), status.refused);
  if (status.launch != cudaSuccess) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("jax_fastattn: attention backward launch failed: ") +
                          cudaGetErrorString(status.launch));
  }
  return ffi::Error::Success();
}

}  // namespace

// The delta rows and the dQ workspace (dq_accum, dq_turns: empty where the
// fused wgmma backward cannot run) are workspace outputs after the
// gradients (XLA keeps an output alive until the kernels ran; FFI scratch
// would be freed too early); cuda_backward is KernelConfig.cuda_backward's
// code (kernel_choice.h).
XLA_FFI_DEFINE_HANDLER_SYMBOL(FastattnBackwardCuda, backward_cuda,
                              bind_backward_args(
                                  ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>())
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<KernelChoice>("cuda_backward"));

}  // namespace cuda
}  // namespace fastattn
