"""Builds and runs the plain C++ kernel test (xla_ffi/tests) with the system
compiler, and the Bazel build when Bazel is installed."""
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cpp_kernel_against_naive_attention(tmp_path):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    sources = [os.path.join(ROOT, "xla_ffi", "tests", "cpu_kernel_test.cc")]
    for folder in ("common", "cpu"):
        directory = os.path.join(ROOT, "xla_ffi", folder)
        sources += [os.path.join(directory, f) for f in sorted(os.listdir(directory)) if f.endswith(".cc")]
    binary = tmp_path / "cpu_kernel_test"
    subprocess.run([compiler, "-std=c++17", "-O2", "-march=native", "-pthread", "-isystem", jax.ffi.include_dir(),
                    *sources, "-o", str(binary)], check=True)
    result = subprocess.run([str(binary)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all checks passed" in result.stdout


@pytest.mark.skipif(shutil.which("bazel") is None, reason="bazel not installed (apt-get install bazel-bootstrap)")
def test_bazel_builds_extension_and_runs_cpp_test(tmp_path):
    env = dict(os.environ, PYTHON_BIN_PATH=shutil.which("python3") or "python3")
    output_base = tmp_path / "bazel_out"
    command = ["bazel", f"--output_user_root={output_base}", "test", "--noshow_progress",
               "//:cpu_kernel_test", "//:_xla_ffi.so"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # The Bazel-built extension is the same module setup.py builds.
    info = subprocess.run(["bazel", f"--output_user_root={output_base}", "info", "bazel-bin"], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=True)
    library = os.path.join(info.stdout.strip(), "_xla_ffi.so")
    loader = importlib.machinery.ExtensionFileLoader("_xla_ffi", library)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("_xla_ffi", loader))
    loader.exec_module(module)
    assert set(module.cpu_targets()) == {"fastattn_forward_cpu", "fastattn_backward_cpu", "fastattn_decode_cpu"}
    subprocess.run(["bazel", f"--output_user_root={output_base}", "shutdown"], cwd=ROOT, env=env)
