"""FastAttention's tiling-mask: one small precomputed mask, sliced per tile.

A causal or sliding-window mask is a band: query i sees key j iff
band_lo <= j - i <= band_hi (`masks.MaskPlan`). Inside a tile whose first
query is q0 and first key k0, whether (q0 + r, k0 + c) satisfies one bound
depends only on c - r plus the tile's offset from the diagonal. So one fixed
lower-triangular matrix C[r, c] = (c <= r) of side `size` serves every tile:
the tile's slice is a window of C shifted by that offset (FastAttention,
arXiv 2410.16663, sec. 3.2; torch_npu's `npu_fusion_attention` uses one such
2048x2048 compressed mask for its causal and band sparse modes). The upper
bound reads C directly, the lower bound reads C transposed; a band tile is
the AND of the two slices. Only PARTIAL tiles need a slice: EMPTY tiles are
skipped and FULL tiles run unmasked (`masks.classify_tiles`).

The slice is exact when tile_q + tile_kv <= size: every offset that leaves a
tile partial fits in the window, and offsets outside it are clamped to a
window that is all-visible or all-masked, as the real tile is.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .. import masks

COMPRESSED_SIZE = 2048  # torch_npu npu_fusion_attention sparse modes 2-4


@dataclasses.dataclass(frozen=True, eq=False)
class CompressedMask:
    """The lower-triangular bool matrix C[r, c] = (c <= r), True = visible."""

    size: int = COMPRESSED_SIZE

    def __post_init__(self):
        if not isinstance(self.size, (int, np.integer)) or self.size < 16:
            raise ValueError(f"size must be an int >= 16, got {self.size!r}")
        rows = np.arange(self.size)
        object.__setattr__(self, "matrix", rows[None, :] <= rows[:, None])

    @property
    def nbytes(self) -> int:
        """Bytes of the stored mask (1 byte per element, bool/uint8)."""
        return self.matrix.nbytes

    def check_tile(self, tile_q: int, tile_kv: int) -> None:
        if tile_q + tile_kv > self.size:
            raise ValueError(
                f"tiling-mask: tile_q + tile_kv = {tile_q} + {tile_kv} must be <= the compressed mask side "
                f"{self.size}, so every partial tile's slice fits inside it")

    def _window(self, shift: int, rows: int, cols: int) -> np.ndarray:
        """C[r, c + shift] for r < rows, c < cols (shift clamped, see module doc)."""
        shift = int(min(max(shift, -(self.size - rows)), self.size - cols))
        if shift >= 0:
            return self.matrix[:rows, shift:shift + cols]
        return self.matrix[-shift:-shift + rows, :cols]

    def upper_slice(self, band_hi: int, q0: int, k0: int, tile_q: int, tile_kv: int) -> np.ndarray:
        """bool [tile_q, tile_kv]: (k0 + c) - (q0 + r) <= band_hi."""
        # Visible iff c - r <= band_hi - (k0 - q0): C[r, c + shift] with shift = k0 - q0 - band_hi.
        return self._window(k0 - q0 - band_hi, tile_q, tile_kv)

    def lower_slice(self, band_lo: int, q0: int, k0: int, tile_q: int, tile_kv: int) -> np.ndarray:
        """bool [tile_q, tile_kv]: (k0 + c) - (q0 + r) >= band_lo."""
        # Visible iff r - c <= (k0 - q0) - band_lo: C^T[c, r + shift] with shift = q0 - k0 + band_lo.
        return self._window(q0 - k0 + band_lo, tile_kv, tile_q).T

    def tile(self, plan: masks.MaskPlan, q0: int, k0: int, tile_q: int, tile_kv: int) -> np.ndarray:
        """bool [tile_q, tile_kv] band visibility of the tile at (q0, k0)
        (positions past q_len / kv_len are not masked here: the kernel masks
        the kv tail by its length)."""
        check_band_only(plan)
        self.check_tile(tile_q, tile_kv)
        visible = np.ones((tile_q, tile_kv), bool)
        if plan.band_hi < masks.UNBOUNDED:
            visible &= self.upper_slice(plan.band_hi, q0, k0, tile_q, tile_kv)
        if plan.band_lo > -masks.UNBOUNDED:
            visible &= self.lower_slice(plan.band_lo, q0, k0, tile_q, tile_kv)
        return visible


def bounds_used(plan: masks.MaskPlan) -> int:
    """How many band bounds are finite (slices a partial tile loads)."""
    return int(plan.band_hi < masks.UNBOUNDED) + int(plan.band_lo > -masks.UNBOUNDED)


def check_band_only(plan: masks.MaskPlan) -> None:
    if plan.q_segment_ids is not None or plan.dense is not None:
        raise ValueError("mask: the Ascend tiling-mask covers Causal and SlidingWindow masks (and their &), "
                         "not Segments or Dense")


def mask_memory(q_len: int, kv_len: int, heads: int = 1, batch: int = 1, size: int = COMPRESSED_SIZE) -> dict:
    """Bytes of the three ways to give a kernel a causal/band mask: dense
    bool [B, H, Sq, Skv] (as a per-head mask tensor; a broadcast [Sq, Skv]
    mask is the heads = batch = 1 case), the compressed size x size mask,
    and the band form (two int64 bounds, what the CPU kernel in xla_ffi/cpu
    takes as band_lo/band_hi attributes)."""
    dense = batch * heads * q_len * kv_len
    compressed = size * size
    band = 2 * 8
    return {"dense_bytes": dense, "compressed_bytes": compressed, "band_bytes": band,
            "dense_over_compressed": dense / compressed}
