// Thin FFI handler of the Volta forward kernel: check buffers, fill
// VoltaForwardParams and enqueue the PTX kernel of the volta_layout
// attribute on XLA's stream.
#include <cuda_runtime.h>

#include "../../common/check.h"
#include "../../common/ffi_decode.h"
#include "../handlers.h"
#include "volta_module.h"

namespace fastattn {
namespace cuda {
namespace {

ffi::Error forward_volta(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                         ffi::AnyBuffer bias, ffi::AnyBuffer q_segment, ffi::AnyBuffer kv_segment,
                         ffi::AnyBuffer dense, ffi::AnyBuffer tile_class,
                         ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> lse,
                         float softmax_scale, int64_t band_lo, int64_t band_hi, int64_t tile_q,
                         int64_t tile_kv, VoltaLayout volta_layout) {
  ForwardParams f;
  if (auto e = decode_forward_args(q, k, v, bias, q_segment, kv_segment, dense, tile_class, *out,
                                   *lse, softmax_scale, band_lo, band_hi, tile_q, tile_kv, &f);
      e.failure())
    return e;
  const AttentionShape& s = f.shape;
  const MaskParams& mask = f.mask;
  const BiasParams& bias_params = f.bias;
  FFI_CHECK(f.dtype == ElementType::kF16,
            "the Volta kernel takes float16 q, k, v (mma.m8n8k4 has no bfloat16)");
  FFI_CHECK(s.head_dim == 64 || s.head_dim == 128,
            "the Volta kernel needs head_dim 64 or 128 (flash_attention pads others), got "
                << s.head_dim);
  FFI_CHECK(tile_q == volta::kTileQ && tile_kv == volta::kTileKv,
            "the Volta kernel's mask plan must use tiles " << volta::kTileQ << "x"
                                                          << volta::kTileKv << ", got " << tile_q
                                                          << "x" << tile_kv);
  FFI_CHECK(s.batch <= 65535 && s.q_heads <= 65535,
            "the Volta kernel needs batch and q heads <= 65535 (grid limits)");
  FFI_CHECK(volta_layout == VoltaLayout::kSwizzled || volta_layout == VoltaLayout::kNaive,
            "KernelConfig.volta_layout has no layout with code "
                << static_cast<int32_t>(volta_layout) << " (0 swizzled, 1 naive)");

  volta::VoltaForwardParams p{};
  p.q = f.q;
  p.k = f.k;
  p.v = f.v;
  p.out = f.out;
  p.lse = f.lse;
  p.bias = bias_params.data;
  p.q_segment = mask.q_segment;
  p.kv_segment = mask.kv_segment;
  p.dense = mask.dense;
  p.tile_class = reinterpret_cast<const signed char*>(mask.tile_class);
  p.q_len = s.q_len;
  p.kv_len = s.kv_len;
  p.q_heads = s.q_heads;
  p.kv_heads = s.kv_heads;
  p.bias_batch = bias_params.batch;
  p.bias_heads = bias_params.heads;
  p.dense_batch = mask.dense_batch;
  p.dense_heads = mask.dense_heads;
  p.tile_batch = mask.tile_batch;
  p.tile_heads = mask.tile_heads;
  p.num_q_tiles = s.num_q_tiles(tile_q);
  p.num_kv_tiles = s.num_kv_tiles(tile_kv);
  p.band_lo = band_lo;
  p.band_hi = band_hi;
  p.softmax_scale = softmax_scale;
  p.scale_log2 = softmax_scale * 1.4426950408889634f;
  const std::string error = volta::launch_forward(p, s.batch, int(s.head_dim), volta_layout, stream);
  if (!error.empty()) {
    return ffi::Error(ffi::ErrorCode::kInternal, "jax_fastattn volta forward: " + error);
  }
  return ffi::Error::Success();
}

}  // namespace

// volta_layout is KernelConfig.volta_layout's code (kernel_choice.h).
XLA_FFI_DEFINE_HANDLER_SYMBOL(FastattnForwardVolta, forward_volta,
                              bind_forward_args(
                                  ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>())
                                  .Attr<VoltaLayout>("volta_layout"));

}  // namespace cuda
}  // namespace fastattn
