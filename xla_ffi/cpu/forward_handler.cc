// Thin FFI handler: decode and check buffers, then call the forward kernel of
// the instruction-set level the cpu_isa attribute asks for (dispatch.h).
#include "../common/check.h"
#include "../common/ffi_decode.h"
#include "dispatch.h"
#include "handlers.h"

namespace fastattn {
namespace cpu {
namespace {

ffi::Error forward_cpu(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                       ffi::AnyBuffer bias, ffi::AnyBuffer q_segment,
                       ffi::AnyBuffer kv_segment, ffi::AnyBuffer dense,
                       ffi::AnyBuffer tile_class, ffi::Result<ffi::AnyBuffer> out,
                       ffi::Result<ffi::AnyBuffer> lse, float softmax_scale, int64_t band_lo,
                       int64_t band_hi, int64_t tile_q, int64_t tile_kv,
                       int32_t cpu_isa) {
  ForwardParams params;
  if (auto e = decode_forward_args(q, k, v, bias, q_segment, kv_segment, dense, tile_class, *out,
                                   *lse, softmax_scale, band_lo, band_hi, tile_q, tile_kv,
                                   &params);
      e.failure())
    return e;
  std::string isa_error;
  const CpuKernels* kernels = select_kernels(cpu_isa, &isa_error);
  FFI_CHECK(kernels != nullptr, isa_error);
  kernels->forward(params);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FastattnForwardCpu, forward_cpu, bind_forward_args(ffi::Ffi::Bind()).Attr<int32_t>("cpu_isa"));

}  // namespace cpu
}  // namespace fastattn
