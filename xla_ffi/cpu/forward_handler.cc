// Thin FFI handler: decode and check buffers, then call cpu::flash_forward.
#include "../common/check.h"
#include "../common/ffi_decode.h"
#include "flash_forward.h"
#include "handlers.h"

namespace fastattn {
namespace cpu {
namespace {

ffi::Error forward_cpu(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                       ffi::AnyBuffer bias, ffi::AnyBuffer q_segment,
                       ffi::AnyBuffer kv_segment, ffi::AnyBuffer dense,
                       ffi::AnyBuffer tile_class, ffi::Result<ffi::AnyBuffer> out,
                       ffi::Result<ffi::AnyBuffer> lse, float softmax_scale, int64_t band_lo,
                       int64_t band_hi, int64_t tile_q, int64_t tile_kv) {
  ForwardParams params;
  if (auto e = decode_shape(q, k, v, &params.shape, &params.dtype); e.failure()) return e;
  const AttentionShape& s = params.shape;
  if (auto e = decode_bias(bias, s, &params.bias); e.failure()) return e;
  if (auto e = decode_mask(q_segment, kv_segment, dense, tile_class, s, band_lo, band_hi,
                           tile_q, tile_kv, &params.mask);
      e.failure())
    return e;
  if (auto e = expect_shape(*out, "out", {s.batch, s.q_len, s.q_heads, s.head_dim},
                            q.element_type());
      e.failure())
    return e;
  if (auto e = expect_shape(*lse, "lse", {s.batch, s.q_heads, s.q_len}, ffi::DataType::F32);
      e.failure())
    return e;
  params.q = q.untyped_data();
  params.k = k.untyped_data();
  params.v = v.untyped_data();
  params.softmax_scale = softmax_scale;
  params.out = out->untyped_data();
  params.lse = static_cast<float*>(lse->untyped_data());
  flash_forward(params);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FastattnForwardCpu, forward_cpu,
                              ffi::Ffi::Bind()
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

}  // namespace cpu
}  // namespace fastattn
