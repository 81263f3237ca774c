// Error helpers for FFI handlers: every failed check names the argument and
// what is allowed, and comes back to Python as a readable XlaRuntimeError.
#pragma once

#include <string>
#include <type_traits>

#include "xla/ffi/api/ffi.h"

namespace fastattn {

// Builds error messages with `<<` but without iostreams: some Python builds
// link extensions against a static libstdc++ whose locale machinery crashes
// inside a process that already loaded the shared one (seen with jaxlib
// 0.11.2 on the GPU machine), and messages need no locale.
class Message {
 public:
  Message& operator<<(const char* text) { text_ += text; return *this; }
  Message& operator<<(const std::string& text) { text_ += text; return *this; }
  template <typename Number, typename = std::enable_if_t<std::is_arithmetic_v<Number>>>
  Message& operator<<(Number value) { text_ += std::to_string(value); return *this; }
  const std::string& str() const { return text_; }

 private:
  std::string text_;
};

// Usage: FFI_CHECK(q.rank == 4, "q must have rank 4 [B, Sq, Hq, D], got rank " << r);
#define FFI_CHECK(cond, message)                                              \
  do {                                                                        \
    if (!(cond)) {                                                            \
      ::fastattn::Message fastattn_check_message;                             \
      fastattn_check_message << "jax_fastattn: " << message;                  \
      return ::xla::ffi::Error(::xla::ffi::ErrorCode::kInvalidArgument,       \
                               fastattn_check_message.str());                 \
    }                                                                         \
  } while (0)

}  // namespace fastattn
