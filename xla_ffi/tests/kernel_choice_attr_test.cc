// A CPU handler that decodes the kernel-choice attributes exactly as the CUDA
// handlers do (the enum decodings of cuda/handlers.h) and writes their codes
// to its int32 [2] output: [cuda_forward, volta_layout]. tests/
// test_kernel_config.py builds it as a shared library, registers it with
// XLA and calls it with the attributes ffi.CallAttrs.as_ffi gives, so the
// Python-to-C++ path of the choices is checked without a GPU.
#include "cuda/handlers.h"
#include "xla/ffi/api/ffi.h"

namespace {

namespace ffi = ::xla::ffi;
using fastattn::cuda::KernelChoice;
using fastattn::cuda::VoltaLayout;

ffi::Error echo(ffi::Result<ffi::Buffer<ffi::S32>> out, KernelChoice cuda_forward,
                VoltaLayout volta_layout) {
  out->typed_data()[0] = static_cast<int32_t>(cuda_forward);
  out->typed_data()[1] = static_cast<int32_t>(volta_layout);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FastattnKernelChoiceEcho, echo,
                              ffi::Ffi::Bind()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<KernelChoice>("cuda_forward")
                                  .Attr<VoltaLayout>("volta_layout"));
