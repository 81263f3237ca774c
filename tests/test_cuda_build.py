"""The CUDA attention kernels without a GPU: nvcc compiles the forward and
backward kernels (mma.sync and wgmma) for sm80 and sm90a, and ptxas reports
no register spills and no stack for any variant (a spill in the inner loop
would cost far more than it shows in tests) and no serialised wgmma."""
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ptxas_report(source, tmp_path):
    run = subprocess.run(
        ["nvcc", "-std=c++17", "-O3", "--use_fast_math", "-I" + os.path.join(ROOT, "xla_ffi"),
         "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a",
         "-Xptxas", "-v", "-c", os.path.join(ROOT, "xla_ffi", "cuda", source),
         "-o", str(tmp_path / "kernel.o")],
        capture_output=True, text=True, check=True)
    report = run.stdout + run.stderr
    kernels = re.findall(r"Compiling entry function '(\w+)' for '(sm_\w+)'", report)
    figures = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert len(kernels) == len(figures), report[-2000:]
    return list(zip(kernels, figures)), report


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("source,variants", [
    # Kernel name: its variants, x 2 dtypes x 2 targets. The mma.sync
    # forward: the 16-row kernel at D=256 and at D=128 under the general
    # mask, the 32-row ("tall") one at D=64 (both mask variants) and at D=128
    # under the band mask alone. The others: head dims 64/128; the wgmma
    # forward and dK/dV also have band-only and general-mask variants, the
    # sm90 dK/dV kernel three dQ modes (separate, ordered, atomic).
    ("attention_sm80.cu", {"forward_kernel": 8, "forward_tall_kernel": 12}),
    ("attention_sm90.cu", {"forward_wgmma_kernel": 20}),  # and 176-key steps at D=128
    ("attention_backward_sm80.cu", {"delta_kernel": 8, "dkdv_kernel": 8, "dq_kernel": 8}),
    ("attention_backward_sm90.cu", {"dq_wgmma_kernel": 8, "dkdv_wgmma_kernel": 48, "dq_convert_kernel": 8}),
], ids=lambda x: x if isinstance(x, str) else "")
def test_kernels_have_no_spills(tmp_path, source, variants):
    entries, report = _ptxas_report(source, tmp_path)
    # ptxas says when it has to serialize wgmma (a silent several-fold slowdown).
    assert "wgmma" not in report.lower().replace("wgmma_kernel", ""), report[-2000:]
    for name, count in variants.items():
        found = [(arch, figure) for (kernel, arch), figure in entries if name in kernel]
        assert len(found) == count, (name, report[-2000:])
        assert {arch for arch, _ in found} == {"sm_80", "sm_90a"}
        for arch, figure in found:
            assert figure == ("0", "0", "0"), (name, arch, figure)
