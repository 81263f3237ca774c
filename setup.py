"""Builds xla_ffi/ into jax_fastattn/_xla_ffi*.so.

The CPU kernels are always built. On x86-64 the kernel sources
(xla_ffi/cpu/*.cc but the *_handler.cc files and dispatch.cc) are compiled
once per instruction-set level (CPU_LEVELS: AVX2, AVX-512, AVX-512+BF16,
AMX), each into its own namespace, and dispatch.cc picks one at run time
from cpuid (KernelConfig.cpu_isa may force one): one build runs on every
x86-64 CPU with AVX2 and uses what the CPU has.
  FASTATTN_CPU_ARCH    a -march value (e.g. "native") builds one level only,
                       for that target (development; always on non-x86).
CUDA kernels (xla_ffi/cuda) are added when nvcc is found:
  FASTATTN_CUDA        "0" never, "1" always (fail without nvcc), unset: auto.
  FASTATTN_CUDA_ARCHS  ";"-separated SM list (default "80;90a").
  FASTATTN_NVCC_FLAGS  extra nvcc flags (e.g. "-DFASTATTN_DECODE_STAGES=3").
The CUDA runtime is linked statically (libcudart_static); the driver comes
from the machine, as for JAX itself.
"""
import glob
import os
import platform
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

# The CPU kernels' instruction-set levels (names as KernelConfig.cpu_isa)
# and their flags, lowest first: the link keeps the first copy of any
# inline function the levels share (std:: templates), and the lowest copy
# runs on every CPU that runs a higher level.
CPU_LEVELS = {
    "avx2": ["-march=x86-64-v3", "-Wno-psabi"],  # vfloat (64 bytes) spans 2 ymm
    "avx512": ["-march=x86-64-v4"],
    "avx512_bf16": ["-march=x86-64-v4", "-mavx512bf16"],
    "amx": ["-march=x86-64-v4", "-mavx512bf16", "-mamx-tile", "-mamx-bf16"],
}
arch = os.environ.get("FASTATTN_CPU_ARCH", "")
if not arch and platform.machine().lower() not in ("x86_64", "amd64"):
    arch = "native"
MULTI_LEVEL = not arch
include_dirs = [os.path.join(ROOT, "xla_ffi"), pybind11.get_include()]
cpu_baseline_sources = sources("xla_ffi/cpu/*_handler.cc", "xla_ffi/cpu/dispatch.cc")
cpu_level_sources = [s for s in sources("xla_ffi/cpu/*.cc") if s not in cpu_baseline_sources]
cxx_sources = sources("xla_ffi/bindings.cc", "xla_ffi/common/*.cc")
cxx_sources += cpu_baseline_sources if MULTI_LEVEL else sources("xla_ffi/cpu/*.cc")
macros, libraries, library_dirs = [], [], []
if MULTI_LEVEL:
    macros.append(("FASTATTN_CPU_MULTI_LEVEL", "1"))


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
    extra_compile_args=["-isystem", jax.ffi.include_dir(), "-O3", *([f"-march={arch}"] if arch else []), "-fno-math-errno", "-Wall",
                        "-Wno-unused-function"],
    extra_link_args=["-pthread"],
    # Rebuild when any header or per-level kernel source changes, not only
    # the extension's own .cc files.
    depends=sorted(glob.glob(os.path.join(ROOT, "xla_ffi", "**", "*.h"), recursive=True)) + cpu_level_sources,
)


def stale(obj, inputs):
    return not os.path.exists(obj) or os.path.getmtime(obj) < max(map(os.path.getmtime, inputs))


class BuildWithCuda(build_ext):
    """Compiles the CPU kernels once per CPU_LEVELS level, and
    xla_ffi/cuda/*.cu with nvcc, into objects linked into the extension (one
    object per source and level; one per source, every arch of
    FASTATTN_CUDA_ARCHS)."""

    def cpu_level_objects(self, ext):
        """Objects of every level, in CPU_LEVELS order; the levels compile in
        parallel (one compiler process per core)."""
        from concurrent.futures import ThreadPoolExecutor

        headers = glob.glob(os.path.join(ROOT, "xla_ffi", "**", "*.h"), recursive=True)
        flags = [f for f in ext.extra_compile_args if not f.startswith("-march=")]
        jobs = []
        for level, level_flags in CPU_LEVELS.items():
            output_dir = os.path.join(self.build_temp, "cpu_" + level)
            for source in cpu_level_sources:
                obj = self.compiler.object_filenames([source], output_dir=output_dir)[0]
                jobs.append((source, obj, output_dir, level, level_flags))

        def compile_one(job):
            source, obj, output_dir, level, level_flags = job
            if self.force or stale(obj, [os.path.join(ROOT, source)] + headers):
                self.compiler.compile([source], output_dir=output_dir,
                                      macros=ext.define_macros + [("FASTATTN_ISA_NS", "isa_" + level)],
                                      include_dirs=ext.include_dirs, extra_postargs=flags + level_flags)
            return obj

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            return list(pool.map(compile_one, jobs))

    def build_extension(self, ext):
        if MULTI_LEVEL:
            ext.extra_objects = list(ext.extra_objects or []) + self.cpu_level_objects(ext)
        if NVCC:
            build_dir = os.path.join(self.build_temp, "cuda")
            os.makedirs(build_dir, exist_ok=True)
            gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
            headers = glob.glob(os.path.join(ROOT, "xla_ffi", "**", "*.h"), recursive=True)
            objects = []
            for source in sources("xla_ffi/cuda/*.cu"):
                obj = os.path.join(build_dir, os.path.basename(source) + ".o")
                inputs = [os.path.join(ROOT, source)] + headers
                if self.force or stale(obj, inputs):
                    command = [NVCC, "-std=c++17", "-O3", "-Xcompiler", "-fPIC", "--use_fast_math",
                               "-I" + os.path.join(ROOT, "xla_ffi"), *gencode,
                               *os.environ.get("FASTATTN_NVCC_FLAGS", "").split(), "-c", source, "-o", obj]
                    print(" ".join(command))
                    subprocess.check_call(command, cwd=ROOT)
                objects.append(obj)
            ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extension(ext)


setup(ext_modules=[extension], cmdclass={"build_ext": BuildWithCuda})
