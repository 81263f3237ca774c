"""FastAttention's two-level tiling plan for Ascend (arXiv 2410.16663, sec. 3.1).

Level 1 is the block the Cube and Vector cores hand to each other through
L2/global memory: the Cube computes S = Q K^T for a [block_q, block_kv]
block, the Vector runs the online softmax on it, the Cube computes P V, the
Vector rescales and accumulates O. Each handoff is a cross-core
synchronisation, so large level-1 blocks (CANN's FlashAttentionScore uses
S2 blocks of 1024 keys for 128 query rows) mean few syncs and a deep
Cube/Vector pipeline. Level 2 splits each level-1 block into the tiles that
fit the Cube's L1 and L0A/L0B/L0C buffers, in 16x16 fractals, and into the
Vector's Unified-Buffer sub-blocks (~32 KiB of fp32 scores, CANN's 8 x 1024).
A single-level plan (`two_level=False`) uses one 128 x 128 tile for both,
as FlashAttention-2's GPU tiling mapped directly onto the NPU would.

`plan()` checks every buffer level and raises ValueError when a tile does
not fit; its counters (syncs, bytes per level, FLOPs) are exact counts of
what the tile simulator (`simulator.py`) does, computed in closed form.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from .. import masks
from . import tiling_mask
from .hardware import ASCEND_910B, KIB, AscendHardware, get_hardware

DTYPE_BYTES = {"float16": 2, "bfloat16": 2}
SYNCS_PER_BLOCK = 3           # S ready (Cube->Vector), P ready (Vector->Cube), P.V ready (Cube->Vector)
PRELOAD_BLOCKS = 2            # the Cube issues two blocks ahead of the Vector (CANN FlashAttentionScore)
VECTOR_SLOT_BYTES = 32 * KIB  # one Vector sub-block of fp32 scores (CANN: 8 x 1024 fp32)
# Vector work per score element: scale, mask select, row max, subtract, exp,
# row sum, cast to fp16; per output element: rescale and add. Op counts, not
# cycles (exp costs more than an add): part of the model.
VECTOR_OPS_PER_SCORE = 7
VECTOR_OPS_PER_OUTPUT = 2
TWO_LEVEL_BLOCK = (128, 1024)
SINGLE_LEVEL_BLOCK = (128, 128)
L0_TILE = 128


def round_up(x, multiple: int):
    return -(-x // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    batch: int
    q_len: int
    kv_len: int
    q_heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, shape) -> "AttentionShape":
        """From an AttentionShape, (B, S, H, D) or (B, Sq, Skv, Hq, Hkv, D)."""
        if isinstance(shape, AttentionShape):
            return shape
        values = tuple(shape)
        if len(values) == 4:
            b, s, h, d = values
            values = (b, s, s, h, h, d)
        if len(values) != 6 or not all(isinstance(v, (int, np.integer)) and v >= 1 for v in values):
            raise ValueError("shape must be (B, S, H, D) or (B, Sq, Skv, Hq, Hkv, D) of positive ints, "
                             f"got {shape!r}")
        result = cls(*(int(v) for v in values))
        if result.q_heads % result.kv_heads:
            raise ValueError(f"shape: q_heads {result.q_heads} must be a multiple of kv_heads {result.kv_heads}")
        return result


@dataclasses.dataclass(frozen=True)
class Level1:
    """Cube<->Vector block and the Vector's sub-block inside it."""

    block_q: int
    block_kv: int
    vector_rows: int     # rows of one Vector sub-block (UB ping-pong slot)


@dataclasses.dataclass(frozen=True)
class Level2:
    """L0 matmul tile: Cube computes [tile_q, tile_kv] of S over tile_d of
    the head dim (and [tile_q, tile_d] of P V over tile_kv keys)."""

    tile_q: int
    tile_kv: int
    tile_d: int


@dataclasses.dataclass(frozen=True)
class Counters:
    """What one attention call moves and computes, summed over all blocks."""

    syncs: int
    blocks: int            # level-1 blocks computed (empty ones skipped)
    partial_blocks: int    # blocks that load tiling-mask slices
    units: int             # (batch, head, q-block) work items spread over Cube cores
    cube_flops: int
    vector_ops: int
    bytes: dict            # gm_to_l1, l1_to_l0, l0c_out, gm_to_ub, ub_to_gm
    exchange_bytes: int    # part of those bytes that is S, P and P.V handed between Cube and Vector
    kv_bytes: int          # part of gm_to_l1 that is K and V

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, eq=False)
class TilingPlan:
    shape: AttentionShape
    dtype: str
    hw: AscendHardware
    two_level: bool
    level1: Level1
    level2: Level2
    mask_plan: masks.MaskPlan
    block_classes: np.ndarray   # int8 [nq, nk]: masks.EMPTY / PARTIAL / FULL (as masks.classify_tiles)
    occupancy: dict             # buffer -> (bytes used, capacity)
    counters: Counters

    @property
    def element_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def blocks_per_unit(self) -> np.ndarray:
        """Level-1 blocks each q-block row computes (its kv loop length)."""
        return np.sum(self.block_classes != masks.EMPTY, axis=1)

    def describe(self) -> str:
        s, l1, l2, c = self.shape, self.level1, self.level2, self.counters
        lines = [
            f"{self.hw.name}: {'two' if self.two_level else 'single'}-level plan, "
            f"B={s.batch} Sq={s.q_len} Skv={s.kv_len} Hq={s.q_heads} Hkv={s.kv_heads} D={s.head_dim} {self.dtype}",
            f"  level 1 (Cube<->Vector block): {l1.block_q} x {l1.block_kv}, Vector sub-block "
            f"{l1.vector_rows} x {l1.block_kv} fp32, Cube {PRELOAD_BLOCKS} blocks ahead, UB ping-pong",
            f"  level 2 (L0 tile, 16x16 fractals): {l2.tile_q} x {l2.tile_kv} over d {l2.tile_d}, double-buffered",
            "  buffer occupancy:",
        ]
        for name, (used, capacity) in self.occupancy.items():
            lines.append(f"    {name:<14} {used / KIB:9.1f} KiB of {capacity / KIB:9.1f} KiB ({100 * used / capacity:5.1f}%)")
        lines.append(f"  blocks {c.blocks} ({c.partial_blocks} partial, tiling-mask slices), "
                     f"Cube<->Vector syncs {c.syncs}")
        lines.append("  bytes: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in c.bytes.items()))
        return "\n".join(lines)


def _matmul_l0_bytes(m, n, k, m0: int, n0: int, element_bytes: int):
    """L1 -> L0A/L0B bytes of an output-stationary [m, k] x [k, n] matmul in
    [m0, n0] output tiles: A is reloaded once per output tile column, B
    once per output tile row (k is streamed in k0 chunks, no reuse)."""
    return (m * k * (-(-n // n0)) + k * n * (-(-m // m0))) * element_bytes


def _occupancy(hw: AscendHardware, l1: Level1, l2: Level2, head_dim_padded: int, element_bytes: int) -> dict:
    d = head_dim_padded
    es = element_bytes
    rows_per_vector = -(-l1.block_q // hw.vector_per_cube)
    slot = l1.vector_rows * l1.block_kv * 4
    ub = (2 * slot                                    # ping-pong in: scores, then P.V partials
          + 2 * l1.vector_rows * l1.block_kv * es     # ping-pong out: P in fp16/bf16
          + 2 * l1.vector_rows * l1.block_kv          # ping-pong tiling-mask slice (1 byte/elem)
          + rows_per_vector * d * 4                   # O accumulator, fp32
          + round_up(rows_per_vector * 3 * 4, 32))    # row max, row sum, rescale (32 B aligned)
    l1_bytes = (l1.block_q * d * es                   # Q block, resident over the kv loop
                + 2 * l2.tile_kv * d * es * 2         # K and V chunks, double-buffered
                + 2 * l1.block_q * l2.tile_kv * es)   # P chunk, double-buffered
    l0a = 2 * max(l2.tile_q * l2.tile_d, l2.tile_q * l2.tile_kv) * es
    l0b = 2 * max(l2.tile_d * l2.tile_kv, l2.tile_kv * l2.tile_d) * es
    l0c = 2 * max(l2.tile_q * l2.tile_kv, l2.tile_q * l2.tile_d) * 4
    block_workspace = l1.block_q * l1.block_kv * (4 + es) + l1.block_q * d * 4
    occupancy = {"L1": (l1_bytes, hw.l1_bytes), "L0A": (l0a, hw.l0a_bytes), "L0B": (l0b, hw.l0b_bytes),
                 "L0C": (l0c, hw.l0c_bytes), "UB": (ub, hw.ub_bytes)}
    if hw.cube_vector_via_l2:
        # S, P and P.V of the blocks in flight (Cube runs PRELOAD_BLOCKS ahead) for every Cube core.
        occupancy["L2 workspace"] = ((PRELOAD_BLOCKS + 1) * block_workspace * hw.cube_cores, hw.l2_bytes)
    return occupancy


def block_columns(mask_plan: masks.MaskPlan, block_q: int, block_kv: int):
    """int64 [nq, nk] first key and key count each level-1 block computes.

    A block sits on the block_kv grid (so its class is `classify_tiles`'), but
    its columns are clipped to the keys its q block can see under the band,
    the start floored to the 16-key fractal (CANN's per-row s2 start / end):
    the causal diagonal block then computes up to the diagonal, not the
    whole 1024 keys. Blocks with no column left have count 0.
    """
    nq, nk = -(-mask_plan.q_len // block_q), -(-mask_plan.kv_len // block_kv)
    q_first = np.arange(nq, dtype=np.int64) * block_q
    q_last = np.minimum(q_first + block_q, mask_plan.q_len) - 1
    lo = max(mask_plan.band_lo, -mask_plan.q_len - mask_plan.kv_len)
    hi = min(mask_plan.band_hi, mask_plan.q_len + mask_plan.kv_len)
    visible_first = np.clip(q_first + lo, 0, mask_plan.kv_len) // 16 * 16
    visible_end = np.clip(q_last + hi + 1, 0, mask_plan.kv_len)
    k_first = np.arange(nk, dtype=np.int64) * block_kv
    first = np.maximum(k_first[None, :], visible_first[:, None])
    end = np.minimum(np.minimum(k_first + block_kv, mask_plan.kv_len)[None, :], visible_end[:, None])
    return first, np.maximum(end - first, 0)


def _counters(shape: AttentionShape, mask_plan: masks.MaskPlan, l1: Level1, l2: Level2, classes: np.ndarray,
              element_bytes: int) -> Counters:
    es = element_bytes
    d = round_up(shape.head_dim, 16)
    bounds = tiling_mask.bounds_used(mask_plan)
    q_starts = np.arange(classes.shape[0]) * l1.block_q
    bq = round_up(np.minimum(l1.block_q, shape.q_len - q_starts), 16)[:, None].astype(np.int64)
    _, columns = block_columns(mask_plan, l1.block_q, l1.block_kv)
    bk = round_up(columns, 16)
    live = (classes != masks.EMPTY) & (columns > 0)
    partial = live & (classes == masks.PARTIAL)
    heads = shape.batch * shape.q_heads

    def total(per_block) -> int:
        return int(np.sum(np.where(live, np.broadcast_to(per_block, live.shape), 0))) * heads

    per_unit_rows = bq[:, 0] * np.any(live, axis=1)
    kv_bytes = total(2 * bk * d * es)
    gm_to_l1 = kv_bytes + total(bq * bk * es) + int(np.sum(per_unit_rows)) * d * es * heads
    l1_to_l0 = total(_matmul_l0_bytes(bq, bk, d, l2.tile_q, l2.tile_kv, es)
                     + _matmul_l0_bytes(bq, d, bk, l2.tile_q, l2.tile_d, es))
    l0c_out = total(bq * bk * 4 + bq * d * 4)
    mask_bytes = int(np.sum(np.where(partial, bq * bk, 0))) * bounds * heads
    gm_to_ub = total(bq * bk * 4 + bq * d * 4) + mask_bytes
    ub_to_gm = total(bq * bk * es) + int(np.sum(per_unit_rows)) * (d * es + 4) * heads
    blocks = int(np.sum(live)) * heads
    return Counters(
        syncs=SYNCS_PER_BLOCK * blocks, blocks=blocks, partial_blocks=int(np.sum(partial)) * heads,
        units=int(np.sum(np.any(live, axis=1))) * heads,
        cube_flops=total(4 * bq * bk * d),
        vector_ops=total(VECTOR_OPS_PER_SCORE * bq * bk + VECTOR_OPS_PER_OUTPUT * bq * d),
        bytes={"gm_to_l1": gm_to_l1, "l1_to_l0": l1_to_l0, "l0c_out": l0c_out,
               "gm_to_ub": gm_to_ub, "ub_to_gm": ub_to_gm},
        exchange_bytes=total(2 * (bq * bk * 4 + bq * bk * es + bq * d * 4)),
        kv_bytes=kv_bytes)


def _check_tile(name: str, value, multiple: int = 16) -> int:
    if not isinstance(value, (int, np.integer)) or value < multiple or value % multiple:
        raise ValueError(f"{name} must be a positive multiple of {multiple} (the 16x16 fractal), got {value!r}")
    return int(value)


def plan(shape, dtype="float16", hw: AscendHardware = ASCEND_910B, *, causal: bool = False,
         mask: Optional[masks.Mask] = None, two_level: bool = True, level1: Optional[tuple] = None,
         level2: Optional[tuple] = None, compressed_size: int = tiling_mask.COMPRESSED_SIZE) -> TilingPlan:
    """The tiling plan of one attention call on `hw`.

    shape: (B, S, H, D), (B, Sq, Skv, Hq, Hkv, D) or an AttentionShape.
    dtype: "float16" or "bfloat16" (inputs; accumulation is fp32).
    causal / mask: Causal and SlidingWindow masks (and their &), as in
      `flash_attention`; empty blocks are skipped, partial ones use
      tiling-mask slices.
    two_level: False gives the single-level 128 x 128 plan.
    level1: (block_q, block_kv) override; level2: (tile_q, tile_kv, tile_d)
      override. Raises ValueError if any buffer overflows.
    """
    hw = get_hardware(hw)
    shape = AttentionShape.of(shape)
    try:
        dtype = str(np.dtype(dtype)) if dtype not in DTYPE_BYTES else dtype
    except TypeError:
        pass  # an unknown name: reported below
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)} (Cube inputs; fp32 accumulation), got {dtype}")
    es = DTYPE_BYTES[dtype]
    mask_plan = masks.make_plan(mask, causal, shape.batch, shape.q_heads, shape.q_len, shape.kv_len)
    tiling_mask.check_band_only(mask_plan)
    d = round_up(shape.head_dim, 16)

    block_q, block_kv = level1 if level1 is not None else (TWO_LEVEL_BLOCK if two_level else SINGLE_LEVEL_BLOCK)
    block_q = min(_check_tile("level1 block_q", block_q), round_up(shape.q_len, 16))
    block_kv = min(_check_tile("level1 block_kv", block_kv), round_up(shape.kv_len, 16))
    rows_per_vector = -(-block_q // hw.vector_per_cube)
    vector_rows = max(1, min(rows_per_vector, VECTOR_SLOT_BYTES // (block_kv * 4)))
    l1 = Level1(block_q, block_kv, vector_rows)
    if level2 is None:
        level2 = (min(L0_TILE, block_q), min(L0_TILE, block_kv), min(L0_TILE, d))
    tile_q, tile_kv, tile_d = (_check_tile(f"level2 {n}", v) for n, v in zip(("tile_q", "tile_kv", "tile_d"), level2))
    if tile_q > block_q or tile_kv > block_kv:
        raise ValueError(f"level2 tile ({tile_q}, {tile_kv}) must not exceed the level-1 block ({block_q}, {block_kv})")
    l2 = Level2(tile_q, min(tile_kv, block_kv), min(tile_d, d))

    occupancy = _occupancy(hw, l1, l2, d, es)
    over = {k: v for k, v in occupancy.items() if v[0] > v[1]}
    if over:
        detail = ", ".join(f"{k} needs {u / KIB:.1f} KiB of {c / KIB:.1f} KiB" for k, (u, c) in over.items())
        raise ValueError(f"tiling plan does not fit {hw.name}: level1 {block_q}x{block_kv}, level2 "
                         f"{tile_q}x{tile_kv}x{tile_d}, D={shape.head_dim} {dtype}: {detail}")
    if mask_plan.has_band:
        tiling_mask.CompressedMask(compressed_size).check_tile(block_q, block_kv)

    classes = np.asarray(masks.classify_tiles(mask_plan, block_q, block_kv))[0, 0]
    classes = np.where(block_columns(mask_plan, block_q, block_kv)[1] > 0, classes, masks.EMPTY).astype(np.int8)
    counters = _counters(shape, mask_plan, l1, l2, classes, es)
    return TilingPlan(shape, dtype, hw, two_level, l1, l2, mask_plan, classes, occupancy, counters)
