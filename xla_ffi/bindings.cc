// pybind11 module exposing the FFI handlers as PyCapsules, for
// jax.ffi.register_ffi_target. Holds no logic of its own.
#include <pybind11/pybind11.h>

#include "cpu/handlers.h"
#ifdef FASTATTN_WITH_CUDA
#include "cuda/handlers.h"
#endif

namespace py = pybind11;

namespace {

template <typename Handler>
py::capsule capsule(Handler* handler) {
  return py::capsule(reinterpret_cast<void*>(handler), "xla._CUSTOM_CALL_TARGET");
}

}  // namespace

PYBIND11_MODULE(_xla_ffi, m) {
  m.doc() = "jax_fastattn XLA FFI handlers";
  m.def("cpu_targets", [] {
    py::dict targets;
    targets["fastattn_forward_cpu"] = capsule(fastattn::cpu::FastattnForwardCpu);
    targets["fastattn_backward_cpu"] = capsule(fastattn::cpu::FastattnBackwardCpu);
    targets["fastattn_decode_cpu"] = capsule(fastattn::cpu::FastattnDecodeCpu);
    return targets;
  });
  // Empty when the library was built without nvcc.
  m.def("cuda_targets", [] {
    py::dict targets;
#ifdef FASTATTN_WITH_CUDA
    targets["fastattn_decode_cuda"] = capsule(fastattn::cuda::FastattnDecodeCuda);
    targets["fastattn_forward_cuda"] = capsule(fastattn::cuda::FastattnForwardCuda);
    targets["fastattn_backward_cuda"] = capsule(fastattn::cuda::FastattnBackwardCuda);
#endif
#ifdef FASTATTN_WITH_VOLTA
    targets["fastattn_forward_volta"] = capsule(fastattn::cuda::FastattnForwardVolta);
#endif
    return targets;
  });
}
