"""Kernel tuning knobs: a frozen, hashable dataclass per backend (usable as a
static argument), with a default per device kind. Never read from the
environment."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Tile sizes of one backend. The mask plan is classified at exactly these
    sizes, so the kernel and its tile classes always agree."""

    tile_q: int
    tile_kv: int


# CPU kernel: a work item is (batch, head, 64-row q tile); the 64 x 128
# float32 logits tile (32 KiB) plus q, K^T, V tiles (up to 64 KiB each at
# D=128) live in the 2 MiB L2 of one core, and 64 rows give 16 register
# blocks of 4 rows. 128 keys per kv tile halves loop overhead against 64
# and was faster on the 2-core CI machine (see docs/BENCHMARKS.md).
CPU_TILES = TileConfig(tile_q=64, tile_kv=128)

# Pure-JAX backend: large tiles amortise XLA's per-iteration loop cost.
XLA_TILES = TileConfig(tile_q=256, tile_kv=512)

# Volta kernel (xla_ffi/cuda/sm70): 4 warps x 32 query rows, 32 keys per
# step; fixed in the kernel (volta_params.h kTileQ / kTileKv).
VOLTA_TILES = TileConfig(tile_q=128, tile_kv=32)

# CUDA sm80+ forward kernel (xla_ffi/cuda/attention_sm80.cu): 4 warps x 16
# query rows, 64 keys per step (attention.h kForwardTileQ / kForwardTileKv).
CUDA_TILES = TileConfig(tile_q=64, tile_kv=64)
