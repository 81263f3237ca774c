// XLA FFI handler symbols of the CUDA custom calls.
#pragma once

#include "xla/ffi/api/api.h"

namespace fastattn {
namespace cuda {

// fastattn_decode_cuda: (q, k, v, lengths, page_table) -> (out, workspace);
// attrs softmax_scale, num_splits. The workspace is an output (not FFI
// scratch, which is freed when the handler returns, before the kernels run).
XLA_FFI_DECLARE_HANDLER_SYMBOL(FastattnDecodeCuda);

}  // namespace cuda
}  // namespace fastattn
