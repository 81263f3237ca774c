"""Builds xla_ffi/ into jax_fastattn/_xla_ffi*.so.

The CPU kernels are always built. Compiler flags:
  FASTATTN_CPU_ARCH    value for -march (default "native": the kernels are
                       vectorised for the machine that builds them; use e.g.
                       "x86-64-v3" for a portable AVX2 build).
CUDA kernels (xla_ffi/cuda) are added when nvcc is found:
  FASTATTN_CUDA        "0" never, "1" always (fail without nvcc), unset: auto.
  FASTATTN_CUDA_ARCHS  ";"-separated SM list (default "80;90a").
  FASTATTN_NVCC_FLAGS  extra nvcc flags (e.g. "-DFASTATTN_DECODE_STAGES=3").
The CUDA runtime is linked statically (libcudart_static); the driver comes
from the machine, as for JAX itself.
"""
import glob
import os
import shutil
import subprocess
import sys

import jax.ffi
import pybind11
from setuptools import setup
from pybind11.setup_helpers import Pybind11Extension, build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def sources(*patterns):
    return sorted(os.path.relpath(path, ROOT) for pattern in patterns
                  for path in glob.glob(os.path.join(ROOT, pattern)))


def find_nvcc():
    choice = os.environ.get("FASTATTN_CUDA", "")
    if choice == "0":
        return None
    nvcc = shutil.which("nvcc")
    if nvcc is None and choice == "1":
        raise RuntimeError("FASTATTN_CUDA=1 but nvcc is not on PATH")
    return os.path.realpath(nvcc) if nvcc else None


def find_cuda_home(nvcc):
    """The toolkit folder holding include/cuda_runtime.h (nvcc may be a
    wrapper script outside it)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  os.path.dirname(os.path.dirname(nvcc)), "/usr/local/cuda"]
    for home in filter(None, candidates):
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    raise RuntimeError(f"nvcc at {nvcc}, but no CUDA toolkit with include/cuda_runtime.h; set CUDA_HOME")


NVCC = find_nvcc()
CUDA_HOME = find_cuda_home(NVCC) if NVCC else None
ARCHS = [a for a in os.environ.get("FASTATTN_CUDA_ARCHS", "80;90a").split(";") if a]

arch = os.environ.get("FASTATTN_CPU_ARCH", "native")
include_dirs = [os.path.join(ROOT, "xla_ffi"), pybind11.get_include()]
cxx_sources = sources("xla_ffi/bindings.cc", "xla_ffi/common/*.cc", "xla_ffi/cpu/*.cc")
macros, libraries, library_dirs = [], [], []


def volta_ptx_header():
    """Folder of the generated volta_ptx.h (the Volta kernel's compute_70 PTX,
    from NVRTC 12), or None when neither NVRTC nor an earlier header is
    there. FASTATTN_VOLTA=0 leaves the Volta kernel out."""
    if os.environ.get("FASTATTN_VOLTA", "") == "0":
        return None
    folder = os.path.join(ROOT, "build", "volta")
    header = os.path.join(folder, "volta_ptx.h")
    sys.path.insert(0, ROOT)
    from build_tools import volta_ptx

    inputs = glob.glob(os.path.join(volta_ptx.KERNEL_DIR, "*.cu")) + \
        glob.glob(os.path.join(volta_ptx.KERNEL_DIR, "*.h")) + [volta_ptx.__file__]
    fresh = os.path.exists(header) and os.path.getmtime(header) >= max(map(os.path.getmtime, inputs))
    if not fresh:
        try:
            volta_ptx.write_header(header)
        except RuntimeError as error:
            if not os.path.exists(header):
                print(f"jax_fastattn: Volta kernel left out ({error})")
                return None
            print(f"jax_fastattn: using the existing {header} ({error})")
    return folder


if NVCC:
    cxx_sources += sources("xla_ffi/cuda/*.cc")
    volta_folder = volta_ptx_header()
    if volta_folder:
        cxx_sources += sources("xla_ffi/cuda/sm70/*.cc")
        include_dirs.append(volta_folder)
        macros.append(("FASTATTN_WITH_VOLTA", "1"))
    include_dirs.append(os.path.join(CUDA_HOME, "include"))
    macros.append(("FASTATTN_WITH_CUDA", "1"))
    libraries += ["cudart_static", "dl", "rt"]
    library_dirs += [os.path.join(CUDA_HOME, "lib64"), os.path.join(CUDA_HOME, "lib")]

extension = Pybind11Extension(
    "jax_fastattn._xla_ffi",
    cxx_sources,
    include_dirs=include_dirs,
    define_macros=macros,
    libraries=libraries,
    library_dirs=library_dirs,
    cxx_std=17,
    extra_compile_args=["-isystem", jax.ffi.include_dir(), "-O3", f"-march={arch}", "-fno-math-errno", "-Wall",
                        "-Wno-unused-function"],
    extra_link_args=["-pthread"],
    # Rebuild when any header changes, not only the .cc files.
    depends=sorted(glob.glob(os.path.join(ROOT, "xla_ffi", "**", "*.h"), recursive=True)),
)


class BuildWithCuda(build_ext):
    """Compiles xla_ffi/cuda/*.cu with nvcc into objects linked into the
    extension (one object per source, every arch of FASTATTN_CUDA_ARCHS)."""

    def build_extension(self, ext):
        if NVCC:
            build_dir = os.path.join(self.build_temp, "cuda")
            os.makedirs(build_dir, exist_ok=True)
            gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
            headers = glob.glob(os.path.join(ROOT, "xla_ffi", "**", "*.h"), recursive=True)
            objects = []
            for source in sources("xla_ffi/cuda/*.cu"):
                obj = os.path.join(build_dir, os.path.basename(source) + ".o")
                inputs = [os.path.join(ROOT, source)] + headers
                if self.force or not os.path.exists(obj) or \
                        os.path.getmtime(obj) < max(os.path.getmtime(p) for p in inputs):
                    command = [NVCC, "-std=c++17", "-O3", "-Xcompiler", "-fPIC", "--use_fast_math",
                               "-I" + os.path.join(ROOT, "xla_ffi"), *gencode,
                               *os.environ.get("FASTATTN_NVCC_FLAGS", "").split(), "-c", source, "-o", obj]
                    print(" ".join(command))
                    subprocess.check_call(command, cwd=ROOT)
                objects.append(obj)
            ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extension(ext)


setup(ext_modules=[extension], cmdclass={"build_ext": BuildWithCuda})
