// Thin FFI handler: decode and check buffers, then call the decode kernel of
// the instruction-set level the cpu_isa attribute asks for (dispatch.h).
#include "../common/check.h"
#include "../common/ffi_decode.h"
#include "dispatch.h"
#include "handlers.h"

namespace fastattn {
namespace cpu {
namespace {

ffi::Error decode_cpu(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                      ffi::AnyBuffer lengths, ffi::AnyBuffer page_table,
                      ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> lse,
                      float softmax_scale, int32_t cpu_isa) {
  DecodeParams params;
  if (auto e = decode_decode_args(q, k, v, lengths, page_table, *out, *lse, &params); e.failure())
    return e;
  params.softmax_scale = softmax_scale;
  std::string isa_error;
  const CpuKernels* kernels = select_kernels(cpu_isa, &isa_error);
  FFI_CHECK(kernels != nullptr, isa_error);
  kernels->decode(params);
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
                                  .Ret<ffi::AnyBuffer>()  // lse
                                  .Attr<float>("softmax_scale")
                                  .Attr<int32_t>("cpu_isa"));

}  // namespace cpu
}  // namespace fastattn
