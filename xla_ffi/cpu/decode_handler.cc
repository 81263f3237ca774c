// Thin FFI handler: decode and check buffers, then call cpu::decode_attention.
#include "../common/ffi_decode.h"
#include "decode.h"
#include "handlers.h"

namespace fastattn {
namespace cpu {
namespace {

ffi::Error decode_cpu(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                      ffi::AnyBuffer lengths, ffi::AnyBuffer page_table,
                      ffi::Result<ffi::AnyBuffer> out, float softmax_scale) {
  DecodeParams params;
  if (auto e = decode_decode_args(q, k, v, lengths, page_table, *out, &params); e.failure())
    return e;
  params.softmax_scale = softmax_scale;
  decode_attention(params);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FastattnDecodeCpu, decode_cpu,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k cache or pages
                                  .Arg<ffi::AnyBuffer>()  // v cache or pages
                                  .Arg<ffi::AnyBuffer>()  // lengths
                                  .Arg<ffi::AnyBuffer>()  // page_table (empty: contiguous)
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Attr<float>("softmax_scale"));

}  // namespace cpu
}  // namespace fastattn
