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
  if (auto e = decode_forward_args(q, k, v, bias, q_segment, kv_segment, dense, tile_class, *out,
                                   *lse, softmax_scale, band_lo, band_hi, tile_q, tile_kv,
                                   &params);
      e.failure())
    return e;
  flash_forward(params);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FastattnForwardCpu, forward_cpu, bind_forward_args(ffi::Ffi::Bind()));

}  // namespace cpu
}  // namespace fastattn
