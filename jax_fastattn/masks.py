"""Attention masks as a small algebra, and their tile classification.

A mask is a frozen dataclass: `Causal`, `SlidingWindow`, `Segments`, `Dense`,
combined with `&` (intersection). Before a kernel runs, a mask is lowered to a
`MaskPlan`: a band (static key range per query, from Causal/SlidingWindow),
optional segment ids and an optional dense bool array. From the plan,
`classify_tiles` labels every (q tile, kv tile) pair EMPTY, PARTIAL or FULL
(FastAttention's tiling-mask): kernels skip empty tiles, apply the mask
element-wise only inside partial ones and not at all in full ones. The full
[Sq, Skv] mask is never built for bands or segments; segment and dense
classification runs on device (works under jit and vmap), band
classification is done once, in numpy, at trace time.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

from .errors import ArgumentError

EMPTY, PARTIAL, FULL = 0, 1, 2
# Band bound meaning "no bound on this side"; kept well inside int64.
UNBOUNDED = 1 << 62

_ALIGNS = ("bottom_right", "top_left")


class Mask:
    """Base class of all masks: supports `a & b`."""

    def __and__(self, other: "Mask") -> "Mask":
        if not isinstance(other, Mask):
            raise ArgumentError(f"mask: can only intersect masks with masks, got {type(other).__name__}")
        return And(_parts(self) + _parts(other))


def _parts(mask: Mask) -> tuple:
    return mask.parts if isinstance(mask, And) else (mask,)


def _check_align(align: str) -> None:
    if align not in _ALIGNS:
        raise ArgumentError(f"mask: align must be one of {_ALIGNS}, got {align!r}")


@dataclasses.dataclass(frozen=True)
class Causal(Mask):
    """Query i sees keys j <= i + offset, offset = Skv - Sq ("bottom_right",
    FlashAttention >= 2.1; what chunked prefill needs) or 0 ("top_left", as
    jax.nn.dot_product_attention(is_causal=True))."""

    align: str = "bottom_right"

    def __post_init__(self):
        _check_align(self.align)


@dataclasses.dataclass(frozen=True)
class SlidingWindow(Mask):
    """Query i sees key j iff i+off-left <= j <= i+off+right (inclusive;
    None = unbounded), off aligned as in `Causal`. For Sq == Skv this is
    jax's `local_window_size=(left, right)`."""

    left: Optional[int]
    right: Optional[int]
    align: str = "bottom_right"

    def __post_init__(self):
        _check_align(self.align)
        for name in ("left", "right"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0):
                raise ArgumentError(f"mask: SlidingWindow {name} must be a non-negative int or None, got {value!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class Segments(Mask):
    """Packed documents: query i of row b sees key j iff
    q_ids[b, i] == kv_ids[b, j]; negative ids are padding (see nothing, are
    seen by nothing). int32 [B, Sq] and [B, Skv]; may be traced."""

    q_ids: Any
    kv_ids: Any


@dataclasses.dataclass(frozen=True, eq=False)
class Dense(Mask):
    """Explicit bool mask [B|1, H|1, Sq, Skv], True = attend; may be traced."""

    mask: Any


@dataclasses.dataclass(frozen=True, eq=False)
class And(Mask):
    """Intersection of masks (build it with `a & b`)."""

    parts: tuple


@dataclasses.dataclass(frozen=True, eq=False)
class MaskPlan:
    """A mask lowered for one call's shapes. Key j is visible from query i iff
    band_lo <= j - i <= band_hi, segment ids match (if any), dense allows it
    (if any), and j < kv_len."""

    q_len: int
    kv_len: int
    band_lo: int = -UNBOUNDED
    band_hi: int = UNBOUNDED
    q_segment_ids: Any = None   # int32 [B, Sq]
    kv_segment_ids: Any = None  # int32 [B, Skv]
    dense: Any = None           # bool [B|1, H|1, Sq, Skv]

    @property
    def has_band(self) -> bool:
        return self.band_lo > -UNBOUNDED or self.band_hi < UNBOUNDED

    @property
    def is_trivial(self) -> bool:
        return not self.has_band and self.q_segment_ids is None and self.dense is None


def _shape_str(x) -> str:
    return str(tuple(np.shape(x)))


def make_plan(mask: Optional[Mask], causal: bool, batch: int, heads: int, q_len: int, kv_len: int) -> MaskPlan:
    """Lowers `mask` (and `causal=True`) for these shapes, checking the shapes
    and dtypes of mask arrays. Raises ValueError/TypeError naming `mask`."""
    if mask is not None and not isinstance(mask, Mask):
        raise ArgumentError(
            "mask must be a jax_fastattn.masks mask (Causal, SlidingWindow, Segments, Dense or their `&`), "
            f"got {type(mask).__name__}")
    parts = list(_parts(mask)) if mask is not None else []
    if causal:
        parts.append(Causal())
    lo, hi = -UNBOUNDED, UNBOUNDED
    q_ids = kv_ids = None
    dense = None
    for part in parts:
        offset = kv_len - q_len if getattr(part, "align", "bottom_right") == "bottom_right" else 0
        if isinstance(part, Causal):
            hi = min(hi, offset)
        elif isinstance(part, SlidingWindow):
            if part.left is not None:
                lo = max(lo, offset - int(part.left))
            if part.right is not None:
                hi = min(hi, offset + int(part.right))
        elif isinstance(part, Segments):
            part_q, part_kv = _check_segments(part, batch, q_len, kv_len)
            if q_ids is None:
                q_ids, kv_ids = part_q, part_kv
            else:  # a second segmentation: its pairs become a dense mask
                extra = (part_q[:, None, :, None] == part_kv[:, None, None, :]) & (part_q[:, None, :, None] >= 0)
                dense = extra if dense is None else dense & extra
        elif isinstance(part, Dense):
            checked = _check_dense(part, batch, heads, q_len, kv_len)
            dense = checked if dense is None else dense & checked
        else:
            raise ArgumentError(f"mask: unknown mask part {type(part).__name__}")
    return MaskPlan(q_len, kv_len, lo, hi, q_ids, kv_ids, dense)


def _check_segments(part: Segments, batch: int, q_len: int, kv_len: int):
    for name, ids, length in (("q_ids", part.q_ids, q_len), ("kv_ids", part.kv_ids, kv_len)):
        if np.shape(ids) != (batch, length):
            raise ArgumentError(
                f"mask: Segments {name} must have shape [B, {'Sq' if name == 'q_ids' else 'Skv'}] = "
                f"{(batch, length)}, got {_shape_str(ids)}")
        if not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
            raise ArgumentError(f"mask: Segments {name} must be an integer array, got dtype {jnp.result_type(ids)}")
    return jnp.asarray(part.q_ids, jnp.int32), jnp.asarray(part.kv_ids, jnp.int32)


def _check_dense(part: Dense, batch: int, heads: int, q_len: int, kv_len: int):
    shape = np.shape(part.mask)
    ok = (len(shape) == 4 and shape[0] in (1, batch) and shape[1] in (1, heads)
          and shape[2] == q_len and shape[3] == kv_len)
    if not ok:
        raise ArgumentError(
            f"mask: Dense mask must have shape [B|1, H|1, Sq, Skv] with B={batch}, H={heads}, "
            f"Sq={q_len}, Skv={kv_len}; got {_shape_str(part.mask)}")
    if jnp.result_type(part.mask) != jnp.bool_:
        raise ArgumentError(f"mask: Dense mask must be bool (True = attend), got dtype {jnp.result_type(part.mask)}")
    return jnp.asarray(part.mask)


# ----------------------------------------------------------------------------
# Tile classification (tiling-mask)


def _band_tiles(plan: MaskPlan, tile_q: int, tile_kv: int) -> np.ndarray:
    """[nq, nk] classes of the band alone, in numpy (static)."""
    nq = -(-plan.q_len // tile_q)
    nk = -(-plan.kv_len // tile_kv)
    q_first = np.arange(nq)[:, None] * tile_q
    q_last = np.minimum(q_first + tile_q, plan.q_len) - 1
    k_first = np.arange(nk)[None, :] * tile_kv
    k_last = np.minimum(k_first + tile_kv, plan.kv_len) - 1
    # Row i sees [i + lo, i + hi]; both ends grow with i.
    empty = (q_last + plan.band_hi < k_first) | (q_first + plan.band_lo > k_last) | (plan.band_lo > plan.band_hi)
    full = (q_last + plan.band_lo <= k_first) & (q_first + plan.band_hi >= k_last)
    return np.where(empty, EMPTY, np.where(full, FULL, PARTIAL)).astype(np.int8)


def _pad_edge(x, multiple: int, axis: int):
    pad = (-x.shape[axis]) % multiple
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, mode="edge")


def _segment_tiles(q_ids, kv_ids, tile_q: int, tile_kv: int):
    """[B, 1, nq, nk] classes of the segment mask, on device."""
    big = jnp.int32(2**31 - 1)

    def ranges(ids, tile):
        # Padded positions repeat the last real id: they change no range.
        tiles = _pad_edge(ids, tile, 1).reshape(ids.shape[0], -1, tile)
        real = tiles >= 0
        low = jnp.min(jnp.where(real, tiles, big), axis=-1)
        high = jnp.max(jnp.where(real, tiles, -1), axis=-1)
        has_padding = jnp.any(~real, axis=-1)
        return low, high, has_padding

    q_low, q_high, q_pad = ranges(q_ids, tile_q)
    k_low, k_high, k_pad = ranges(kv_ids, tile_kv)
    q_low, q_high, q_pad = q_low[:, :, None], q_high[:, :, None], q_pad[:, :, None]
    k_low, k_high, k_pad = k_low[:, None, :], k_high[:, None, :], k_pad[:, None, :]
    # No real id in common range (an all-padding tile has low > high): empty.
    empty = (q_high < k_low) | (k_high < q_low) | (q_low > q_high) | (k_low > k_high)
    full = (~q_pad) & (~k_pad) & (q_low == q_high) & (k_low == k_high) & (q_low == k_low)
    classes = jnp.where(empty, EMPTY, jnp.where(full, FULL, PARTIAL)).astype(jnp.int8)
    return classes[:, None]


def _dense_tiles(dense, tile_q: int, tile_kv: int):
    """[B|1, H|1, nq, nk] classes of a dense mask, on device."""
    b, h, sq, skv = dense.shape
    nq, nk = -(-sq // tile_q), -(-skv // tile_kv)
    widths = ((0, 0), (0, 0), (0, nq * tile_q - sq), (0, nk * tile_kv - skv))
    tiles_any = jnp.pad(dense, widths, constant_values=False).reshape(b, h, nq, tile_q, nk, tile_kv)
    tiles_all = jnp.pad(dense, widths, constant_values=True).reshape(b, h, nq, tile_q, nk, tile_kv)
    any_visible = jnp.any(tiles_any, axis=(3, 5))
    all_visible = jnp.all(tiles_all, axis=(3, 5))
    return jnp.where(all_visible, FULL, jnp.where(any_visible, PARTIAL, EMPTY)).astype(jnp.int8)


def classify_tiles(plan: MaskPlan, tile_q: int, tile_kv: int):
    """int8 [B|1, H|1, nq, nk]: EMPTY / PARTIAL / FULL for every tile pair.

    Intersection of the parts is the minimum of their classes (EMPTY <
    PARTIAL < FULL). Classes describe real positions only: the padded tail of
    the last kv tile is masked by kernels regardless of class.
    """
    classes = jnp.asarray(_band_tiles(plan, tile_q, tile_kv))[None, None]
    if plan.q_segment_ids is not None:
        classes = jnp.minimum(classes, _segment_tiles(plan.q_segment_ids, plan.kv_segment_ids, tile_q, tile_kv))
    if plan.dense is not None:
        classes = jnp.minimum(classes, _dense_tiles(plan.dense, tile_q, tile_kv))
    return classes


# ----------------------------------------------------------------------------
# Element-wise visibility, for the reference and for partial tiles of the
# pure-JAX backend.


def visible(plan: MaskPlan, q_index, kv_index, dense_tile=None, q_ids=None, kv_ids=None):
    """bool [B|1, H|1, len(q_index), len(kv_index)] visibility of the given
    query/key positions. `dense_tile`, `q_ids`, `kv_ids` are the plan's arrays
    already sliced to these positions (or None to take the plan's whole
    arrays, when q_index/kv_index are full ranges)."""
    rel = kv_index[None, :] - q_index[:, None]
    # Clamp to int32: |j - i| < 2**31 for any real sequence.
    lo, hi = max(plan.band_lo, -(2**30)), min(plan.band_hi, 2**30)
    result = (rel >= lo) & (rel <= hi) & (kv_index[None, :] < plan.kv_len)
    result = result[None, None]
    if plan.q_segment_ids is not None:
        q_ids = plan.q_segment_ids if q_ids is None else q_ids
        kv_ids = plan.kv_segment_ids if kv_ids is None else kv_ids
        same = (q_ids[:, :, None] == kv_ids[:, None, :]) & (q_ids[:, :, None] >= 0)
        result = result & same[:, None]
    if plan.dense is not None:
        result = result & (plan.dense if dense_tile is None else dense_tile)
    return result


def materialize(plan: MaskPlan):
    """The full bool mask [B|1, H|1, Sq, Skv] (for the reference only)."""
    return visible(plan, jnp.arange(plan.q_len), jnp.arange(plan.kv_len))
