"""The ordered one-pass CUDA backward adds the key blocks' dQ to a q tile
in descending block order, each block waiting for the turn equal to its
rank there (the number of blocks adding before it). Under the band mask
alone the kernel computes that rank from the band (xla_ffi/cuda/dq_order.h)
instead of counting in the mask plan; the plan decides which blocks visit
a tile. If the two disagreed, a block would wait for a turn that never
comes. This checks the C++ rank, compiled for the host, against the ranks
the plan itself implies, for causal masks (both alignments), sliding
windows, no mask, ragged lengths and Sq != Skv."""
import os
import shutil
import subprocess

import numpy as np
import pytest

from jax_fastattn import masks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
XLA_FFI = os.path.join(ROOT, "xla_ffi")
TILE = 64    # the backward's plan tiles (kBackwardTileQ = kBackwardTileKv)
BLOCK = 128  # keys per CTA of the dK/dV kernel: two plan tiles

MASKS = [None, masks.Causal(), masks.Causal("top_left"), masks.SlidingWindow(100, 0),
         masks.SlidingWindow(37, 250), masks.SlidingWindow(0, 0), masks.SlidingWindow(None, 90, "top_left"),
         masks.SlidingWindow(300, None)]
LENGTHS = [(64, 64), (700, 650), (650, 700), (129, 1000), (1000, 129), (1, 513), (2304, 2304), (3000, 300)]


def plan_ranks(mask, q_len, kv_len):
    """(q_last, band_hi, kv_block, rank) of every key block the plan has add
    to a q tile, rank counted in the plan."""
    plan = masks.make_plan(mask, False, 1, 1, q_len, kv_len)
    visible = np.asarray(masks.classify_tiles(plan, TILE, TILE))[0, 0] != masks.EMPTY
    num_q, num_kv = visible.shape
    rows = []
    for m in range(num_q):
        adding = [n for n in range(-(-num_kv // 2)) if visible[m, 2 * n] or (2 * n + 1 < num_kv and visible[m, 2 * n + 1])]
        q_last = min((m + 1) * TILE, q_len) - 1
        rows += [(q_last, plan.band_hi, n, sum(other > n for other in adding)) for n in adding]
    return rows


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_band_rank_matches_the_plan(tmp_path):
    binary = tmp_path / "dq_order_test"
    subprocess.run(["g++", "-std=c++17", "-O1", "-I", XLA_FFI, os.path.join(XLA_FFI, "tests", "dq_order_test.cc"),
                    "-o", str(binary)], check=True, capture_output=True)
    cases, expected = [], []
    for mask in MASKS:
        for q_len, kv_len in LENGTHS:
            for q_last, band_hi, block, rank in plan_ranks(mask, q_len, kv_len):
                cases.append(f"{q_last} {band_hi} {kv_len} {block} {BLOCK}")
                expected.append(rank)
    assert len(cases) > 1000 and max(expected) > 10  # the cases reach long chains
    got = subprocess.run([str(binary)], input="\n".join(cases) + "\n", check=True, capture_output=True,
                         text=True).stdout.split()
    assert [int(r) for r in got] == expected
