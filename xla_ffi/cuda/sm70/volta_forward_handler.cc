// Thin FFI handler of the Volta forward kernel: check buffers, fill
// VoltaForwardParams and enqueue the PTX kernel on XLA's stream.
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
                         int64_t tile_kv) {
  AttentionShape s;
  ElementType dtype;
  if (auto e = decode_shape(q, k, v, &s, &dtype); e.failure()) return e;
  FFI_CHECK(dtype == ElementType::kF16,
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
  BiasParams bias_params;
  if (auto e = decode_bias(bias, s, &bias_params); e.failure()) return e;
  MaskParams mask;
  if (auto e = decode_mask(q_segment, kv_segment, dense, tile_class, s, band_lo, band_hi, tile_q,
                           tile_kv, &mask);
      e.failure())
    return e;
  if (auto e = expect_shape(*out, "out", {s.batch, s.q_len, s.q_heads, s.head_dim},
                            q.element_type());
      e.failure())
    return e;
  if (auto e = expect_shape(*lse, "lse", {s.batch, s.q_heads, s.q_len}, ffi::DataType::F32);
      e.failure())
    return e;

  volta::VoltaForwardParams p{};
  p.q = q.untyped_data();
  p.k = k.untyped_data();
  p.v = v.untyped_data();
  p.out = out->untyped_data();
  p.lse = static_cast<float*>(lse->untyped_data());
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
  const std::string error = volta::launch_forward(p, s.batch, int(s.head_dim), stream);
  if (!error.empty()) {
    return ffi::Error(ffi::ErrorCode::kInternal, "jax_fastattn volta forward: " + error);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FastattnForwardVolta, forward_volta,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::AnyBuffer>()  // bias
                                  .Arg<ffi::AnyBuffer>()  // q_segment_ids
                                  .Arg<ffi::AnyBuffer>()  // kv_segment_ids
                                  .Arg<ffi::AnyBuffer>()  // dense
                                  .Arg<ffi::AnyBuffer>()  // tile_class
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Ret<ffi::AnyBuffer>()  // lse
                                  .Attr<float>("softmax_scale")
                                  .Attr<int64_t>("band_lo")
                                  .Attr<int64_t>("band_hi")
                                  .Attr<int64_t>("tile_q")
                                  .Attr<int64_t>("tile_kv"));

}  // namespace cuda
}  // namespace fastattn
