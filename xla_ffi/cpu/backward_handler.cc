// Thin FFI handler: decode and check buffers, then call cpu::flash_backward.
#include "../common/check.h"
#include "../common/ffi_decode.h"
#include "flash_backward.h"
#include "handlers.h"

namespace fastattn {
namespace cpu {
namespace {

ffi::Error backward_cpu(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                        ffi::AnyBuffer out, ffi::AnyBuffer lse, ffi::AnyBuffer d_out,
                        ffi::AnyBuffer d_lse, ffi::AnyBuffer bias, ffi::AnyBuffer q_segment,
                        ffi::AnyBuffer kv_segment, ffi::AnyBuffer dense,
                        ffi::AnyBuffer tile_class, ffi::Result<ffi::AnyBuffer> d_q,
                        ffi::Result<ffi::AnyBuffer> d_k, ffi::Result<ffi::AnyBuffer> d_v,
                        ffi::Result<ffi::AnyBuffer> d_bias, float softmax_scale,
                        int64_t band_lo, int64_t band_hi, int64_t tile_q, int64_t tile_kv) {
  BackwardParams params;
  if (auto e = decode_shape(q, k, v, &params.shape, &params.dtype); e.failure()) return e;
  const AttentionShape& s = params.shape;
  if (auto e = decode_bias(bias, s, &params.bias); e.failure()) return e;
  if (auto e = decode_mask(q_segment, kv_segment, dense, tile_class, s, band_lo, band_hi,
                           tile_q, tile_kv, &params.mask);
      e.failure())
    return e;
  const auto dtype = q.element_type();
  const std::initializer_list<int64_t> q_dims = {s.batch, s.q_len, s.q_heads, s.head_dim};
  const std::initializer_list<int64_t> kv_dims = {s.batch, s.kv_len, s.kv_heads, s.head_dim};
  const std::initializer_list<int64_t> lse_dims = {s.batch, s.q_heads, s.q_len};
  for (auto [buffer, name] : {std::pair{&out, "out"}, std::pair{&d_out, "d_out"}}) {
    if (auto e = expect_shape(*buffer, name, q_dims, dtype); e.failure()) return e;
  }
  if (auto e = expect_shape(lse, "lse", lse_dims, ffi::DataType::F32); e.failure()) return e;
  if (!is_absent(d_lse)) {
    if (auto e = expect_shape(d_lse, "d_lse", lse_dims, ffi::DataType::F32); e.failure())
      return e;
    params.d_lse = static_cast<const float*>(d_lse.untyped_data());
  }
  if (auto e = expect_shape(*d_q, "d_q", q_dims, dtype); e.failure()) return e;
  if (auto e = expect_shape(*d_k, "d_k", kv_dims, dtype); e.failure()) return e;
  if (auto e = expect_shape(*d_v, "d_v", kv_dims, dtype); e.failure()) return e;
  if (params.bias.data != nullptr) {
    if (auto e = expect_shape(*d_bias, "d_bias", {s.batch, s.q_heads, s.q_len, s.kv_len},
                              ffi::DataType::F32);
        e.failure())
      return e;
    params.d_bias = static_cast<float*>(d_bias->untyped_data());
  }
  params.q = q.untyped_data();
  params.k = k.untyped_data();
  params.v = v.untyped_data();
  params.out = out.untyped_data();
  params.lse = static_cast<const float*>(lse.untyped_data());
  params.d_out = d_out.untyped_data();
  params.softmax_scale = softmax_scale;
  params.d_q = d_q->untyped_data();
  params.d_k = d_k->untyped_data();
  params.d_v = d_v->untyped_data();
  flash_backward(params);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FastattnBackwardCpu, backward_cpu,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::AnyBuffer>()  // out
                                  .Arg<ffi::AnyBuffer>()  // lse
                                  .Arg<ffi::AnyBuffer>()  // d_out
                                  .Arg<ffi::AnyBuffer>()  // d_lse
                                  .Arg<ffi::AnyBuffer>()  // bias
                                  .Arg<ffi::AnyBuffer>()  // q_segment_ids
                                  .Arg<ffi::AnyBuffer>()  // kv_segment_ids
                                  .Arg<ffi::AnyBuffer>()  // dense
                                  .Arg<ffi::AnyBuffer>()  // tile_class
                                  .Ret<ffi::AnyBuffer>()  // d_q
                                  .Ret<ffi::AnyBuffer>()  // d_k
                                  .Ret<ffi::AnyBuffer>()  // d_v
                                  .Ret<ffi::AnyBuffer>()  // d_bias
                                  .Attr<float>("softmax_scale")
                                  .Attr<int64_t>("band_lo")
                                  .Attr<int64_t>("band_hi")
                                  .Attr<int64_t>("tile_q")
                                  .Attr<int64_t>("tile_kv"));

}  // namespace cpu
}  // namespace fastattn
