"""The static plan of context-parallel attention: which sequence chunks each
device holds (the layout), and which (query chunk, key chunk) pairs every
ring step computes, with the band mask each pair sees.

Layouts. The sequence (padded to a multiple of `chunks_per_device * N`) is
cut into equal chunks of `chunk_len` tokens.
- "contiguous": device r holds chunk r (N chunks). Under a causal mask
  device r sees r + 1 of the N key chunks, so the last device does ~2x the
  mean work: the naive ring, 52-54 % of linear on 8 GPUs
  (zhuzilin/ring-flash-attention benchmark, 8xH800).
- "zigzag": 2N chunks; device r holds chunk r and chunk 2N-1-r, in that
  order. Under a causal mask every device then sees the same number of
  (query, key) pairs (chunk r sees r + 1 chunks, chunk 2N-1-r sees 2N - r),
  which is what lets the zig-zag ring reach 85-90 % of linear in the same
  benchmark.

Bands. A band (lo, hi) says key j is visible from query i iff
lo <= j - i <= hi, None for "no bound" (Causal: (None, 0); a sliding window
(left, right): (-left, right)). Positions are global token positions; a
block pair whose first key sits `delta` positions after its first query
sees the band (lo - delta, hi - delta) in its own indices.

Ring steps. At ring step t device r holds the K/V of device (r - t) mod N.
A step is run only if some device has a non-empty pair in it; K/V jump
straight from one run step to the next (a ppermute by the step difference),
so a sliding window over a contiguous layout runs 2 steps, not N.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import numpy as np

LAYOUTS = ("zigzag", "contiguous")

Band = Tuple[Optional[int], Optional[int]]


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def chunks_per_device(layout: str) -> int:
    check_layout(layout)
    return 2 if layout == "zigzag" else 1


def chunk_positions(layout: str, num_devices: int) -> np.ndarray:
    """int [N, chunks_per_device]: the chunk index (in natural token order)
    of each local slot of each device."""
    check_layout(layout)
    ranks = np.arange(num_devices)
    if layout == "zigzag":
        return np.stack([ranks, 2 * num_devices - 1 - ranks], axis=1)
    return ranks[:, None]


def layout_order(seq_len: int, num_devices: int, layout: str = "zigzag") -> np.ndarray:
    """Token permutation into `layout` order: x_layout = x[order] along the
    sequence axis, so that an even split over devices gives each device its
    chunks. seq_len must be a multiple of chunks_per_device * N."""
    chunks = chunks_per_device(layout) * num_devices
    if seq_len % chunks:
        raise ValueError(f"seq_len must be a multiple of {chunks} for layout={layout!r} over {num_devices} "
                         f"devices, got {seq_len}")
    chunk_len = seq_len // chunks
    order = chunk_positions(layout, num_devices).reshape(-1)
    return (order[:, None] * chunk_len + np.arange(chunk_len)[None, :]).reshape(-1)


def to_zigzag(x, num_devices: int, axis: int = 1):
    """Reorders the sequence axis of a global array into zig-zag order (what
    `context_parallel_attention(..., input_order="zigzag")` expects). A model
    does this once, to its tokens, positions and segment ids."""
    return x.take(layout_order(x.shape[axis], num_devices), axis=axis)


def from_zigzag(x, num_devices: int, axis: int = 1):
    """Inverse of `to_zigzag`."""
    inverse = np.argsort(layout_order(x.shape[axis], num_devices))
    return x.take(inverse, axis=axis)


def block_band(lo: Optional[int], hi: Optional[int], delta: int, q_len: int, kv_len: int) -> Optional[Band]:
    """The band of a q_len x kv_len block whose first key is `delta`
    positions after its first query, in the block's own indices. None if no
    pair of the block is visible; a bound that cuts no pair becomes None,
    so a fully visible block is (None, None)."""
    rel_lo = None if lo is None else lo - delta
    rel_hi = None if hi is None else hi - delta
    if rel_lo is not None and rel_hi is not None and rel_lo > rel_hi:
        return None
    if rel_hi is not None and rel_hi < -(q_len - 1):   # every key is after what the last query sees
        return None
    if rel_lo is not None and rel_lo > kv_len - 1:     # every key is before what the first query sees
        return None
    if rel_lo is not None and rel_lo <= -(q_len - 1):
        rel_lo = None
    if rel_hi is not None and rel_hi >= kv_len - 1:
        rel_hi = None
    return (rel_lo, rel_hi)


@dataclasses.dataclass(frozen=True)
class RingSchedule:
    """Static ring plan (hashable).

    steps: the ring steps run, ascending (step t: device r holds the K/V of
      device (r - t) mod N).
    bands: block bands a pair may see; bands[0] is None (empty pair).
    branch: [N][len(steps)][m][m] index into `bands` for device r, run step
      i, local query slot a and travelling key slot b.
    """

    num_devices: int
    layout: str
    chunk_len: int
    steps: tuple
    bands: tuple
    branch: tuple

    @property
    def slots(self) -> int:
        return chunks_per_device(self.layout)

    def branch_array(self) -> np.ndarray:
        return np.asarray(self.branch, np.int32).reshape(self.num_devices, len(self.steps), self.slots, self.slots)


def build_ring_schedule(layout: str, num_devices: int, chunk_len: int, lo: Optional[int],
                        hi: Optional[int]) -> RingSchedule:
    positions = chunk_positions(layout, num_devices)
    slots = positions.shape[1]
    bands = [None]
    table = np.zeros((num_devices, num_devices, slots, slots), np.int32)
    for rank in range(num_devices):
        for step in range(num_devices):
            source = (rank - step) % num_devices
            for a in range(slots):
                for b in range(slots):
                    delta = int(positions[source, b] - positions[rank, a]) * chunk_len
                    band = block_band(lo, hi, delta, chunk_len, chunk_len)
                    if band is None:
                        continue
                    if band not in bands:
                        bands.append(band)
                    table[rank, step, a, b] = bands.index(band)
    steps = [t for t in range(num_devices) if table[:, t].any()] or [0]
    table = table[:, steps]
    return RingSchedule(num_devices, layout, chunk_len, tuple(steps), tuple(bands),
                        tuple(int(x) for x in table.reshape(-1)))
