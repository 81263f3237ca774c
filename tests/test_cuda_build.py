"""The CUDA attention kernel without a GPU: nvcc compiles it for sm80 and
sm90a, and ptxas reports no register spills and no stack for any variant
(a spill in the inner loop would cost far more than it shows in tests)."""
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_forward_kernel_has_no_spills(tmp_path):
    run = subprocess.run(
        ["nvcc", "-std=c++17", "-O3", "--use_fast_math", "-I" + os.path.join(ROOT, "xla_ffi"),
         "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a",
         "-Xptxas", "-v", "-c", os.path.join(ROOT, "xla_ffi", "cuda", "attention_sm80.cu"),
         "-o", str(tmp_path / "attention.o")],
        capture_output=True, text=True, check=True)
    report = run.stdout + run.stderr
    kernels = re.findall(r"Compiling entry function '(\w*forward_kernel\w*)' for '(sm_\w+)'", report)
    figures = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", report)
    # 2 head dims x 2 dtypes of the dispatched variant, for both targets.
    assert len(kernels) == 8 and len(figures) == 8, report[-2000:]
    assert {arch for _, arch in kernels} == {"sm_80", "sm_90a"}
    for (name, arch), (stack, stores, loads) in zip(kernels, figures):
        assert (stack, stores, loads) == ("0", "0", "0"), (name, arch)
