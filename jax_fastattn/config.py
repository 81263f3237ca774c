"""Kernel choices as typed, frozen, hashable options (usable as static
arguments): which kernel variant runs and at which tile sizes. The user may
pass one to `flash_attention(..., config=...)`; `None` means the backend's
default (backends.py). Never read from the environment."""
from __future__ import annotations

import dataclasses
from typing import Optional

# Kernel variants of the CUDA backend on sm90 (H100/H200): "auto" takes the
# wgmma kernels where they exist (head dim 64/128; a backward with a bias
# gradient takes mma.sync), "mma_sync" the sm80 kernels that Ampere/Ada run.
# The wgmma backward has three variants: "wgmma" (dK/dV, then dQ in a
# second kernel: seven products per tile, no workspace, bitwise
# reproducible), "wgmma_ordered" (one kernel per key block makes dK, dV and
# dQ: five products per tile; dQ is summed through a float32 workspace of
# 4 bytes per dQ element in a fixed order, so also reproducible; what
# "auto" takes, 1.07-1.30x "wgmma" on an H100) and "wgmma_atomic" (the same
# with dQ's float adds in any order: not reproducible bit for bit; the
# backward alone 0.98-1.09x "wgmma_ordered", 1.26x at D=64 without a mask).
CUDA_FORWARD_KERNELS = ("auto", "wgmma", "mma_sync")
CUDA_BACKWARD_KERNELS = ("auto", "wgmma", "mma_sync", "wgmma_ordered", "wgmma_atomic")
ONE_PASS_BACKWARD_KERNELS = ("wgmma_ordered", "wgmma_atomic")  # they (and "auto" on sm90) take the dQ workspace
WGMMA_BACKWARD_KERNELS = ("wgmma",) + ONE_PASS_BACKWARD_KERNELS
# CUDA decode kernels (decode_attention): "simt", the CUDA-core split
# kernel (every dtype and head dim <= 256, paged caches); "mma_sync", the
# tensor-core one (bf16/f16, head dim 64 or 128, at most 16 q heads per kv
# head). "auto" takes "mma_sync" where it can run the call, else "simt".
CUDA_DECODE_KERNELS = ("auto", "simt", "mma_sync")
# Shared-memory operand layout of the Volta kernel: FastAttention's
# bank-conflict-free swizzle, or the plain row-major layout (the ablation).
VOLTA_LAYOUTS = ("swizzled", "naive")
# Instruction-set level of the CPU kernels (xla_ffi/cpu/dispatch.h): "auto"
# takes the best level the CPU and OS support; the others force one (an
# error where the CPU lacks it). jax_fastattn.ffi.cpu_isa_levels() lists them.
CPU_ISAS = ("auto", "avx2", "avx512", "avx512_bf16", "amx")


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Tile sizes of one backend. The mask plan is classified at exactly these
    sizes, so the kernel and its tile classes always agree."""

    tile_q: int
    tile_kv: int

    def __post_init__(self):
        for name in ("tile_q", "tile_kv"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TileConfig.{name} must be a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Typed kernel options of one flash_attention call.

    tiles: tile sizes of the mask plan (and of the cpu / xla kernels, which
      take any); None = the backend's default. The GPU kernels have fixed
      tiles: passing other sizes to them is an error.
    cuda_forward, cuda_backward: one of CUDA_FORWARD_KERNELS /
      CUDA_BACKWARD_KERNELS.
    cuda_decode: one of CUDA_DECODE_KERNELS (decode_attention only).
    volta_layout: one of VOLTA_LAYOUTS.
    cpu_isa: one of CPU_ISAS, the CPU kernels' instruction-set level.
    """

    tiles: Optional[TileConfig] = None
    cuda_forward: str = "auto"
    cuda_backward: str = "auto"
    cuda_decode: str = "auto"
    volta_layout: str = "swizzled"
    cpu_isa: str = "auto"

    def __post_init__(self):
        if self.tiles is not None and not isinstance(self.tiles, TileConfig):
            raise ValueError(f"KernelConfig.tiles must be a TileConfig or None, got {type(self.tiles).__name__}")
        for name, allowed in (("cuda_forward", CUDA_FORWARD_KERNELS), ("cuda_backward", CUDA_BACKWARD_KERNELS),
                              ("cuda_decode", CUDA_DECODE_KERNELS), ("volta_layout", VOLTA_LAYOUTS),
                              ("cpu_isa", CPU_ISAS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"KernelConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")


DEFAULT = KernelConfig()

# CPU kernel: a work item is (batch, head, 64-row q tile); the 64 x 128
# float32 logits tile (32 KiB) plus the q, K and V tiles (up to 64 KiB each
# at D=128) stay in one core's 2 MiB L2; 128 keys per kv tile halve the loop
# overhead against 64.
CPU_TILES = TileConfig(tile_q=64, tile_kv=128)

# Pure-JAX backend: large tiles amortise XLA's per-iteration loop cost.
XLA_TILES = TileConfig(tile_q=256, tile_kv=512)

# Volta kernel (xla_ffi/cuda/sm70): 4 warps x 32 query rows, 32 keys per
# step; fixed in the kernel (volta_params.h kTileQ / kTileKv).
VOLTA_TILES = TileConfig(tile_q=128, tile_kv=32)

# CUDA kernels: the mask plan's tile is 64 x 64 (attention.h kForwardTileQ /
# kForwardTileKv); the kernels' own, larger steps read several plan tiles.
CUDA_TILES = TileConfig(tile_q=64, tile_kv=64)
