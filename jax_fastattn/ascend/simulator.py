"""Tile-level simulator: executes a `TilingPlan` in NumPy as the kernel would.

For every (batch, head, level-1 q block) the Cube core keeps Q in L1 and
loops over the visible level-1 kv blocks (EMPTY blocks of the tiling-mask
classification are skipped; each block's keys are clipped to the band,
`tiling.block_columns`):

1. Cube: S = Q K^T in level-2 L0 tiles on 16x16 fractals, fp16/bf16
   operands, fp32 accumulation (L0C); S goes out to the GM workspace.  sync
2. Vector: per UB sub-block of rows, scale, tiling-mask slice from the
   compressed mask (PARTIAL blocks only), kv-tail mask, online-softmax
   update of row max / row sum; P = exp(S - max) cast to the input dtype
   goes out to GM.                                                     sync
3. Cube: P V in L0 tiles, fp32; the partial goes out to GM.            sync
4. Vector: O = O * exp(old max - new max) + P V, in the UB accumulator.
At the end the Vector divides by the row sum and writes O and the lse.

Every transfer is counted from the arrays actually moved, so the counters
check `tiling.py`'s closed-form ones. Python loops make it slow: use small
shapes (tests) or the plan alone (`plan()`, `cost.py`) for real sizes.
"""
from __future__ import annotations

import dataclasses
from collections import Counter as _Tally
from typing import Optional

import numpy as np

from .. import masks
from . import tiling as plan_lib
from . import tiling_mask
from .hardware import ASCEND_910B, AscendHardware

FRACTAL = 16


def to_fractal(x: np.ndarray) -> np.ndarray:
    """[M, K] (multiples of 16) -> [M/16, K/16, 16, 16]: the matrix as a grid of
    16x16 fractals, the unit the Cube multiplies (16x16x16 MACs per cycle)."""
    m, k = x.shape
    return x.reshape(m // FRACTAL, FRACTAL, k // FRACTAL, FRACTAL).transpose(0, 2, 1, 3)


def from_fractal(f: np.ndarray) -> np.ndarray:
    mt, kt = f.shape[:2]
    return f.transpose(0, 2, 1, 3).reshape(mt * FRACTAL, kt * FRACTAL)


def cube_matmul(a: np.ndarray, b: np.ndarray, tile_m: int, tile_n: int, tile_k: int, tally: _Tally) -> np.ndarray:
    """fp32 [M, N] = a [M, K] @ b [K, N] as the Cube runs it: output-stationary
    [tile_m, tile_n] tiles in L0C, k streamed in tile_k chunks through
    L0A/L0B, every fractal product accumulated in fp32."""
    a_frac, b_frac = to_fractal(a), to_fractal(b)
    mt, kt = a_frac.shape[:2]
    nt = b_frac.shape[1]
    step_m, step_n, step_k = tile_m // FRACTAL, tile_n // FRACTAL, tile_k // FRACTAL
    c_frac = np.zeros((mt, nt, FRACTAL, FRACTAL), np.float32)
    for mi in range(0, mt, step_m):
        for ni in range(0, nt, step_n):
            accumulator = np.zeros((min(step_m, mt - mi), min(step_n, nt - ni), FRACTAL, FRACTAL), np.float32)
            for ki in range(0, kt, step_k):
                a_tile = a_frac[mi:mi + step_m, ki:ki + step_k]   # -> L0A
                b_tile = b_frac[ki:ki + step_k, ni:ni + step_n]   # -> L0B
                tally["l1_to_l0"] += a_tile.nbytes + b_tile.nbytes
                # Products of fp16/bf16 values are exact in fp32; the sum is fp32 (L0C).
                accumulator += np.einsum("mkab,knbc->mnac", a_tile.astype(np.float32), b_tile.astype(np.float32))
            c_frac[mi:mi + step_m, ni:ni + step_n] = accumulator
    return from_fractal(c_frac)


@dataclasses.dataclass(frozen=True, eq=False)
class SimResult:
    out: np.ndarray       # [B, Sq, Hq, D], input dtype
    lse: np.ndarray       # float32 [B, Hq, Sq]
    counters: plan_lib.Counters
    plan: plan_lib.TilingPlan


def _pad(x: np.ndarray, rows: int, cols: int) -> np.ndarray:
    return np.pad(x, ((0, rows - x.shape[0]), (0, cols - x.shape[1])))


class _VectorState:
    """Online-softmax state of one q block, in the Vector cores' UB."""

    def __init__(self, rows: int, head_dim: int):
        self.row_max = np.full(rows, -np.inf, np.float32)
        self.row_sum = np.zeros(rows, np.float32)
        self.out = np.zeros((rows, head_dim), np.float32)
        self.rescale = np.ones(rows, np.float32)

    def softmax_rows(self, rows: slice, scores: np.ndarray, dtype) -> np.ndarray:
        """Online-softmax update for `rows` from fp32 `scores` (masked = -inf);
        returns P in the input dtype (what the Cube reads for P V)."""
        old_max = self.row_max[rows]
        new_max = np.maximum(old_max, np.max(scores, axis=1))
        safe_max = np.where(np.isfinite(new_max), new_max, np.float32(0))  # a row with no key yet
        probs = np.exp(scores - safe_max[:, None])
        self.rescale[rows] = np.exp(old_max - safe_max)
        self.row_sum[rows] = self.row_sum[rows] * self.rescale[rows] + np.sum(probs, axis=1)
        self.row_max[rows] = new_max
        return probs.astype(dtype)

    def accumulate_rows(self, rows: slice, partial_out: np.ndarray) -> None:
        self.out[rows] = self.out[rows] * self.rescale[rows, None] + partial_out


def simulate(q, k, v, *, causal: bool = False, mask: Optional[masks.Mask] = None,
             softmax_scale: Optional[float] = None, hw: AscendHardware = ASCEND_910B,
             tiling: Optional[plan_lib.TilingPlan] = None, two_level: bool = True,
             level1: Optional[tuple] = None, level2: Optional[tuple] = None,
             compressed_size: int = tiling_mask.COMPRESSED_SIZE) -> SimResult:
    """Runs attention tile by tile. q [B, Sq, Hq, D], k/v [B, Skv, Hkv, D]
    (float16 or bfloat16, numpy or jax arrays). Plan arguments as `plan()`,
    or a ready `tiling` for these shapes."""
    q, k, v = (np.asarray(x) for x in (q, k, v))
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q must be [B, Sq, Hq, D] and k, v [B, Skv, Hkv, D] with equal B and D; "
                         f"got q {q.shape}, k {k.shape}, v {v.shape}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    batch, q_len, q_heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    shape = plan_lib.AttentionShape.of((batch, q_len, kv_len, q_heads, kv_heads, head_dim))
    if tiling is None:
        tiling = plan_lib.plan(shape, str(q.dtype), hw, causal=causal, mask=mask, two_level=two_level,
                               level1=level1, level2=level2, compressed_size=compressed_size)
    elif tiling.shape != shape or tiling.dtype != str(q.dtype):
        raise ValueError(f"tiling was planned for {tiling.shape} {tiling.dtype}, got {shape} {q.dtype}")
    scale = np.float32(1.0 / np.sqrt(head_dim) if softmax_scale is None else softmax_scale)
    compressed = tiling_mask.CompressedMask(compressed_size)
    mplan, l1, l2 = tiling.mask_plan, tiling.level1, tiling.level2
    bounds = tiling_mask.bounds_used(mplan)
    d_pad = plan_lib.round_up(head_dim, FRACTAL)
    group = q_heads // kv_heads
    rows_per_vector = -(-l1.block_q // tiling.hw.vector_per_cube)
    column_first, column_count = plan_lib.block_columns(mplan, l1.block_q, l1.block_kv)
    tally = _Tally()
    out = np.zeros(q.shape, np.float32)
    lse = np.full((batch, q_heads, q_len), -np.inf, np.float32)

    for b in range(batch):
        for h in range(q_heads):
            kv_head = h // group
            for qi, q0 in enumerate(range(0, q_len, l1.block_q)):
                live = np.flatnonzero(tiling.block_classes[qi] != masks.EMPTY)
                if live.size == 0:
                    continue  # every row sees no key: out 0, lse -inf
                rows = min(l1.block_q, q_len - q0)
                bq = plan_lib.round_up(rows, FRACTAL)
                q_block = _pad(q[b, q0:q0 + rows, h], bq, d_pad)
                tally["gm_to_l1"] += q_block.nbytes
                state = _VectorState(bq, d_pad)
                for ki in live:
                    k0, cols = int(column_first[qi, ki]), int(column_count[qi, ki])
                    bk = plan_lib.round_up(cols, FRACTAL)
                    k_block = _pad(k[b, k0:k0 + cols, kv_head], bk, d_pad)
                    v_block = _pad(v[b, k0:k0 + cols, kv_head], bk, d_pad)
                    tally["gm_to_l1"] += k_block.nbytes + v_block.nbytes
                    tally["kv_bytes"] += k_block.nbytes + v_block.nbytes
                    # 1. Cube: S = Q K^T.
                    scores = cube_matmul(q_block, k_block.T, l2.tile_q, l2.tile_kv, l2.tile_d, tally)
                    tally["l0c_out"] += scores.nbytes
                    tally["exchange"] += 2 * scores.nbytes  # written by the Cube, read by the Vector
                    tally["syncs"] += 1
                    # 2. Vector: masks and online softmax, sub-block by sub-block.
                    visible = np.broadcast_to(np.arange(bk) < cols, (bq, bk))
                    if tiling.block_classes[qi, ki] == masks.PARTIAL:
                        visible = visible & compressed.tile(mplan, q0, k0, bq, bk)
                        tally["gm_to_ub"] += bq * bk * bounds  # the slices, 1 byte per element each
                    probs = np.empty((bq, bk), q.dtype)
                    for rows_slice in _sub_blocks(bq, rows_per_vector, l1.vector_rows):
                        sub_scores = scores[rows_slice]
                        tally["gm_to_ub"] += sub_scores.nbytes
                        sub_scores = np.where(visible[rows_slice], sub_scores * scale, -np.inf).astype(np.float32)
                        probs[rows_slice] = state.softmax_rows(rows_slice, sub_scores, q.dtype)
                        tally["ub_to_gm"] += probs[rows_slice].nbytes
                    tally["syncs"] += 1
                    # 3. Cube: P V.
                    tally["gm_to_l1"] += probs.nbytes
                    tally["exchange"] += 2 * probs.nbytes
                    partial_out = cube_matmul(probs, v_block, l2.tile_q, l2.tile_d, l2.tile_kv, tally)
                    tally["l0c_out"] += partial_out.nbytes
                    tally["exchange"] += 2 * partial_out.nbytes
                    tally["syncs"] += 1
                    # 4. Vector: rescale and accumulate.
                    tally["gm_to_ub"] += partial_out.nbytes
                    state.accumulate_rows(slice(0, bq), partial_out)
                    tally["blocks"] += 1
                    tally["partial_blocks"] += int(tiling.block_classes[qi, ki] == masks.PARTIAL)
                    tally["cube_flops"] += 4 * bq * bk * d_pad
                    tally["vector_ops"] += (plan_lib.VECTOR_OPS_PER_SCORE * bq * bk
                                            + plan_lib.VECTOR_OPS_PER_OUTPUT * bq * d_pad)
                seen = state.row_sum > 0
                block_out = np.where(seen[:, None], state.out / np.where(seen, state.row_sum, 1)[:, None], 0)
                block_lse = np.where(seen, state.row_max + np.log(np.where(seen, state.row_sum, 1)), -np.inf)
                tally["ub_to_gm"] += bq * d_pad * q.dtype.itemsize + bq * 4  # O and lse rows
                tally["units"] += 1
                out[b, q0:q0 + rows, h] = block_out[:rows, :head_dim]
                lse[b, h, q0:q0 + rows] = block_lse[:rows]

    counters = plan_lib.Counters(
        syncs=tally["syncs"], blocks=tally["blocks"], partial_blocks=tally["partial_blocks"], units=tally["units"],
        cube_flops=tally["cube_flops"], vector_ops=tally["vector_ops"],
        bytes={key: tally[key] for key in ("gm_to_l1", "l1_to_l0", "l0c_out", "gm_to_ub", "ub_to_gm")},
        exchange_bytes=tally["exchange"], kv_bytes=tally["kv_bytes"])
    return SimResult(out.astype(q.dtype), lse, counters, tiling)


def _sub_blocks(rows: int, rows_per_vector: int, vector_rows: int):
    """Row slices of the UB sub-blocks: each Vector core takes its share of
    the block's rows (AIV0 the top, AIV1 the bottom) in vector_rows slices."""
    for core_first in range(0, rows, rows_per_vector):
        core_end = min(core_first + rows_per_vector, rows)
        for first in range(core_first, core_end, vector_rows):
            yield slice(first, min(first + vector_rows, core_end))
