// Error helpers for FFI handlers: every failed check names the argument and
// what is allowed, and comes back to Python as a readable XlaRuntimeError.
#pragma once

#include <sstream>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace fastattn {

// Usage: FFI_CHECK(q.rank == 4, "q must have rank 4 [B, Sq, Hq, D], got rank " << r);
#define FFI_CHECK(cond, message)                                              \
  do {                                                                        \
    if (!(cond)) {                                                            \
      std::ostringstream fastattn_check_stream;                               \
      fastattn_check_stream << "jax_fastattn: " << message;                   \
      return ::xla::ffi::Error(::xla::ffi::ErrorCode::kInvalidArgument,       \
                               fastattn_check_stream.str());                  \
    }                                                                         \
  } while (0)

}  // namespace fastattn
