"""Roofline-style time model of a tiling plan and of unfused attention.

This is a model, not a measurement: no Ascend hardware was used. Every
stage takes max(compute, data movement) at the peak rates of `hardware.py`
(public figures plus labelled estimates: L2 bandwidth, handoff latency,
op launch overhead).

Fused (FlashAttention-style) kernel, per level-1 block on one Cube core and
its Vector cores:
    cube    = Cube FLOPs / (Cube peak / Cube cores)
    vector  = Vector ops / (Vector peak / Vector cores * Vector cores per Cube)
    memory  = bytes crossing L2 (K, V, Q, O, mask slices, and on 910B the
              S / P / P.V exchange) / (L2 bandwidth / Cube cores)
    latency = (cube + vector + syncs * handoff latency) / blocks in flight
    block   = max(cube, vector, memory, latency)
The Cube issues PRELOAD_BLOCKS blocks ahead, so Cube and Vector overlap and
a handoff's latency is hidden behind other blocks' work unless the blocks
are too small: that is what the last term charges, and why single-level
128 x 128 blocks lose. (batch, head, q-block) units are spread over the
Cube cores longest first; the kernel time is the busiest core's blocks
times the block time plus one pipeline fill, and at least HBM traffic /
HBM bandwidth.

Standard attention is the unfused chain an eager framework runs: Q K^T,
scale, mask, softmax, P V, each a separate op that reads and writes the
[B, H, Sq, Skv] scores in HBM (fp16), at max(compute, HBM traffic) plus a
launch overhead per op.
"""
from __future__ import annotations

import dataclasses
import heapq
from typing import Optional

import numpy as np

from . import tiling as plan_lib
from .hardware import AscendHardware

OP_LAUNCH_US = 10.0   # estimate: host launch + tiling of one eager NPU op


@dataclasses.dataclass(frozen=True)
class FusedTime:
    seconds: float
    bound: str            # which term sets the block time: cube, vector, memory, latency, or hbm overall
    block_us: dict        # per-block cube, vector, memory, latency (microseconds)
    busiest_core_blocks: int
    hbm_bytes: int
    l2_bytes: int         # bytes crossing L2, all cores


@dataclasses.dataclass(frozen=True)
class StandardTime:
    seconds: float
    ops: dict             # op name -> seconds
    peak_bytes: int       # HBM the scores, probabilities and mask need at once
    fits: bool            # peak_bytes (plus q, k, v, o) fit the HBM


def _hbm_bytes(tp: plan_lib.TilingPlan) -> int:
    """Compulsory HBM traffic (Q, K, V read once; O, lse written once) when a
    kv head's K and V stay in L2 while the units that read them run; else K
    and V are re-read from HBM by every q block."""
    s, es, hw = tp.shape, tp.element_bytes, tp.hw
    q_o = 2 * s.batch * s.q_heads * s.q_len * s.head_dim * es + 4 * s.batch * s.q_heads * s.q_len
    kv_head = 2 * s.kv_len * s.head_dim * es
    kv_all = kv_head * s.batch * s.kv_heads
    q_blocks = tp.block_classes.shape[0]
    # Cores take consecutive units (q blocks of one head first): about this many kv heads are live at once.
    heads_live = -(-hw.cube_cores // max(1, q_blocks * (s.q_heads // s.kv_heads))) + 1
    workspace = tp.occupancy.get("L2 workspace", (0, 0))[0]
    if heads_live * kv_head <= hw.l2_bytes - workspace:
        return q_o + kv_all
    return q_o + tp.counters.kv_bytes


def _busiest_core(blocks_per_unit: list, cores: int) -> int:
    """Longest-processing-time-first assignment of units to cores; the most
    blocks any core gets."""
    loads = [0] * cores
    heapq.heapify(loads)
    for blocks in sorted(blocks_per_unit, reverse=True):
        heapq.heapreplace(loads, loads[0] + blocks)
    return max(loads)


def fused_time(tp: plan_lib.TilingPlan, sync_us: Optional[float] = None) -> FusedTime:
    """Modelled time of the fused kernel that `tp` describes."""
    hw: AscendHardware = tp.hw
    c = tp.counters
    sync_s = (hw.sync_us if sync_us is None else sync_us) * 1e-6
    if c.blocks == 0:
        return FusedTime(0.0, "none", {}, 0, 0, 0)
    l2_bytes = sum(c.bytes[k] for k in ("gm_to_l1", "l0c_out", "gm_to_ub", "ub_to_gm"))
    if not hw.cube_vector_via_l2:
        l2_bytes -= c.exchange_bytes  # S, P, P.V stay inside the core (L0C -> UB -> L1)
    per_block = {
        "cube": c.cube_flops / c.blocks / (hw.cube_tflops * 1e12 / hw.cube_cores),
        "vector": c.vector_ops / c.blocks / (hw.vector_tflops * 1e12 / hw.vector_cores * hw.vector_per_cube),
        "memory": l2_bytes / c.blocks / (hw.l2_tbs * 1e12 / hw.cube_cores),
    }
    round_trip = per_block["cube"] + per_block["vector"] + plan_lib.SYNCS_PER_BLOCK * sync_s
    per_block["latency"] = round_trip / plan_lib.PRELOAD_BLOCKS
    bound = max(per_block, key=per_block.get)
    block_s = per_block[bound]
    units = np.repeat(tp.blocks_per_unit, tp.shape.batch * tp.shape.q_heads)
    busiest = _busiest_core([int(u) for u in units if u], hw.cube_cores)
    kernel_s = busiest * block_s + round_trip
    hbm = _hbm_bytes(tp)
    hbm_s = hbm / (hw.hbm_tbs * 1e12)
    if hbm_s > kernel_s:
        bound, kernel_s = "hbm", hbm_s
    return FusedTime(kernel_s, bound, {k: v * 1e6 for k, v in per_block.items()}, busiest, hbm, l2_bytes)


def standard_time(shape, dtype: str, hw: AscendHardware, causal: bool = True) -> StandardTime:
    """Modelled time of unfused attention (separate ops through HBM)."""
    s = plan_lib.AttentionShape.of(shape)
    es = plan_lib.DTYPE_BYTES[dtype]
    scores = s.batch * s.q_heads * s.q_len * s.kv_len          # elements of S and of P
    q_bytes = s.batch * s.q_heads * s.q_len * s.head_dim * es
    kv_bytes = s.batch * s.kv_heads * s.kv_len * s.head_dim * es
    matmul_flops = 2 * scores * s.head_dim
    mask_bytes = s.q_len * s.kv_len if causal else 0              # bool [Sq, Skv], broadcast over B, H
    cube = hw.cube_tflops * 1e12
    vector = hw.vector_tflops * 1e12
    hbm = hw.hbm_tbs * 1e12
    launch = OP_LAUNCH_US * 1e-6
    ops = {  # op -> (compute seconds, HBM bytes)
        "QK^T": (matmul_flops / cube, q_bytes + kv_bytes + scores * es),
        "scale": (scores / vector, 2 * scores * es),
    }
    if causal:
        ops["mask"] = (scores / vector, 2 * scores * es + mask_bytes * s.batch * s.q_heads)
    ops["softmax"] = (5 * scores / vector, 2 * scores * es)   # max, sub, exp, sum, div; one read, one write
    ops["PV"] = (matmul_flops / cube, scores * es + kv_bytes + q_bytes)
    times = {name: max(compute, moved / hbm) + launch for name, (compute, moved) in ops.items()}
    peak = 2 * scores * es + mask_bytes                       # scores and probabilities live at once
    fits = peak + 2 * q_bytes + 2 * kv_bytes <= hw.hbm_bytes
    return StandardTime(sum(times.values()), times, peak, fits)
