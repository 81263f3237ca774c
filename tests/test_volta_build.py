"""The Volta kernel without a GPU: NVRTC 12 compiles it to compute_70 PTX,
ptxas 12 assembles that for sm_70 with no spills and the designed shared
memory, and the bank model confirms the layout derivation."""
import pytest

from build_tools import volta_banks

volta_ptx = pytest.importorskip("build_tools.volta_ptx")


def _toolchain():
    try:
        return volta_ptx.nvrtc_library() and volta_ptx.ptxas_binary()
    except (RuntimeError, ImportError):
        return None


needs_toolchain = pytest.mark.skipif(_toolchain() is None,
                                     reason="needs nvidia-cuda-nvrtc-cu12 and nvidia-cuda-nvcc-cu12 (test extra)")

# 128 query rows + 2 x 32 keys of D halves: Q, K and V tiles, nothing else.
DESIGNED_SHARED_BYTES = {"fastattn_volta_forward_d64": (128 + 64) * 64 * 2,
                         "fastattn_volta_forward_d128": (128 + 64) * 128 * 2}


@needs_toolchain
@pytest.mark.parametrize("swizzled", [True, False], ids=["swizzled", "naive"])
def test_sm70_resources(swizzled):
    ptx = volta_ptx.compile_ptx(swizzled)
    assert ".target sm_70" in ptx and "mma.sync.aligned.m8n8k4" in ptx
    report = volta_ptx.ptxas_report(ptx, "sm_70")
    assert set(report) == set(volta_ptx.KERNELS)
    for kernel, figures in report.items():
        assert figures["spill_stores"] == 0 and figures["spill_loads"] == 0, (kernel, figures)
        assert figures["stack"] == 0, (kernel, figures)
        assert figures["shared_bytes"] == DESIGNED_SHARED_BYTES[kernel], (kernel, figures)
        assert figures["registers"] <= 255, (kernel, figures)


@needs_toolchain
def test_embedded_header(tmp_path):
    header = tmp_path / "volta_ptx.h"
    volta_ptx.write_header(str(header))
    text = header.read_text()
    assert "kSwizzledPtx" in text and "kNaivePtx" in text and text.count(".target sm_70") == 2


@pytest.mark.parametrize("head_dim", [64, 128])
def test_swizzled_layout_is_conflict_free_and_naive_is_not(head_dim):
    for (name, naive), (_, swizzled) in zip(volta_banks.fragment_loads(head_dim, False),
                                           volta_banks.fragment_loads(head_dim, True)):
        assert max(swizzled) == 1, name
        assert min(naive) >= 4, name


def test_swizzle_keeps_row_pieces_together():
    # A 16-byte store of chunks (2p, 2p+1) must land on one aligned 16-byte slot.
    for row in range(128):
        for piece in range(16):
            low = volta_banks.chunk_address(row, 2 * piece, 128, True)
            high = volta_banks.chunk_address(row, 2 * piece + 1, 128, True)
            assert {low // 16} == {high // 16} and abs(low - high) == 8
