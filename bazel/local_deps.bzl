"""Offline repository rule: headers of the installed jaxlib (XLA FFI API),
pybind11 and Python, found through the Python interpreter on PATH (or
$PYTHON_BIN_PATH). Nothing is downloaded."""

def _local_python_deps_impl(rctx):
    python = rctx.os.environ.get("PYTHON_BIN_PATH") or rctx.which("python3")
    if not python:
        fail("local_python_deps: no python3 on PATH (set PYTHON_BIN_PATH)")
    script = ("import jax, pybind11, sysconfig; " +
              "print(jax.ffi.include_dir()); print(pybind11.get_include()); " +
              "print(sysconfig.get_paths()['include'])")
    result = rctx.execute([python, "-c", script])
    if result.return_code != 0:
        fail("local_python_deps: could not import jax and pybind11 with %s:\n%s" % (python, result.stderr))
    jax_include, pybind11_include, python_include = result.stdout.strip().split("\n")
    rctx.symlink(jax_include, "jax_include")
    rctx.symlink(pybind11_include, "pybind11_include")
    rctx.symlink(python_include, "python_include")
    rctx.file("BUILD.bazel", """
package(default_visibility = ["//visibility:public"])

cc_library(
    name = "xla_ffi_api",
    hdrs = glob(["jax_include/xla/ffi/api/*.h"]),
    includes = ["jax_include"],
)

cc_library(
    name = "python_headers",
    hdrs = glob(["python_include/**/*.h"]),
    includes = ["python_include"],
)

cc_library(
    name = "pybind11",
    hdrs = glob(["pybind11_include/pybind11/**/*.h"]),
    includes = ["pybind11_include"],
    deps = [":python_headers"],
)
""")

local_python_deps = repository_rule(
    implementation = _local_python_deps_impl,
    environ = ["PYTHON_BIN_PATH", "PATH"],
    local = True,
)
