// XLA FFI handler symbols of the CPU (Host platform) custom calls.
#pragma once

#include "xla/ffi/api/api.h"

namespace fastattn {
namespace cpu {

// fastattn_forward_cpu: (q, k, v, bias, q_segment_ids, kv_segment_ids, dense,
// tile_class) -> (out, lse); attrs softmax_scale, band_lo, band_hi, tile_q,
// tile_kv.
XLA_FFI_DECLARE_HANDLER_SYMBOL(FastattnForwardCpu);

// fastattn_backward_cpu: (q, k, v, out, lse, d_out, d_lse, bias,
// q_segment_ids, kv_segment_ids, dense, tile_class) -> (dq, dk, dv, dbias);
// same attrs.
XLA_FFI_DECLARE_HANDLER_SYMBOL(FastattnBackwardCpu);

// fastattn_decode_cpu: (q, k, v, lengths, page_table) -> out; attr
// softmax_scale. page_table empty = contiguous cache.
// Every CPU handler also takes the int32 attr cpu_isa (dispatch.h CpuIsa).
XLA_FFI_DECLARE_HANDLER_SYMBOL(FastattnDecodeCpu);

}  // namespace cpu
}  // namespace fastattn
