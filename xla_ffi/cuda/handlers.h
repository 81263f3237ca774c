// XLA FFI handler symbols of the CUDA custom calls.
#pragma once

#include "kernel_choice.h"
#include "xla/ffi/api/api.h"

// Kernel choices arrive as int32 attributes, decoded straight into these
// enums (the handlers check the value).
XLA_FFI_REGISTER_ENUM_ATTR_DECODING(::fastattn::cuda::KernelChoice);
XLA_FFI_REGISTER_ENUM_ATTR_DECODING(::fastattn::cuda::VoltaLayout);

namespace fastattn {
namespace cuda {

// fastattn_decode_cuda: (q, k, v, lengths, page_table) -> (out, workspace);
// attrs softmax_scale, num_splits. The workspace is an output (not FFI
// scratch, which is freed when the handler returns, before the kernels run).
XLA_FFI_DECLARE_HANDLER_SYMBOL(FastattnDecodeCuda);

// fastattn_forward_cuda: the forward custom call's arguments (as the CPU
// one) plus an int32 work counter ([B, Hq, 1], one element used) as a third
// result and the int32 attribute cuda_forward (KernelChoice); bfloat16/
// float16, head_dim 64/128/256, sm80+ (attention_sm80.cu; on sm_90
// attention_sm90.cu for head_dim 64/128, see dispatch.h).
XLA_FFI_DECLARE_HANDLER_SYMBOL(FastattnForwardCuda);

// fastattn_backward_cuda: the backward custom call's arguments (as the CPU
// one) plus a float32 [B, Hq, Sq] delta workspace as a fifth result and the
// int32 attribute cuda_backward (KernelChoice).
XLA_FFI_DECLARE_HANDLER_SYMBOL(FastattnBackwardCuda);

// fastattn_forward_volta: the forward custom call's arguments (as the CPU
// one) and the int32 attribute volta_layout (VoltaLayout); float16,
// head_dim 64/128; runs the compute_70 PTX of sm70/.
XLA_FFI_DECLARE_HANDLER_SYMBOL(FastattnForwardVolta);

}  // namespace cuda
}  // namespace fastattn
