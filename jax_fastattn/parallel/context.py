"""Context parallelism: attention with the sequence axis sharded over a mesh
axis, as a ring (K/V blocks travel by `lax.ppermute` while each device
attends over the block it holds) or as an all-gather of K/V.

Ring (haoliuhl/ringattention, zhuzilin/ring-flash-attention): every device
keeps its queries; at ring step t it holds the K/V of device r - t, runs our
kernel on each (query chunk, key chunk) pair with `return_lse=True` and
merges the partial results exactly through their log-sum-exps
(`merge_partials`). The partial results of a query chunk are kept and merged
once at the end (or whenever those held pass PENDING_MERGE_BYTES), not after
every step: a step's merge reads and writes the f32 running result, which at
8K tokens per device costs ~15 % of the step's kernel time; one merge of P
bf16 parts reads each part once. Which pairs run and under which band is a
static plan (context_schedule.py): empty pairs are skipped, steps where
every device's pairs are empty are not run at all, and with segment ids a
pair whose id ranges do not meet is skipped at run time (`lax.switch`). The
backward is a ring too: K/V travel again, with their dK/dV accumulators, and
each pair's gradients come from the kernel backward given the merged out and
lse (context_block.py). Optimization barriers order each step's transfer
against the compute (`_after`), so transfers overlap compute and no device
ever holds more than two K/V blocks.

All-gather: K/V (and key segment ids) are gathered once; each device runs
one kernel call per local query chunk over the keys it can see. Fewer,
larger calls and no per-step latency: better for short sequences.

Choice (`strategy="auto"`, `choose_strategy`): the ring hides its transfers
behind compute when a ring step's FLOPs per transferred K/V byte reach the
machine balance. Per step a device multiplies its S/N queries (half of them
under a causal mask) by S/N keys: 4 (S/N)^2 Hq D (x 1/2 causal) FLOPs for
2 (S/N) Hkv D b bytes of K and V, an intensity of

    I = 2 S Hq / (N Hkv b)   (halved when causal)

FLOP/byte, MaxText's `seq_len * q_heads / (kv_heads * cp_size)` up to a
constant. Ring when I >= RING_MIN_INTENSITY (1024 FLOP/byte: an H100/H200
sustains ~500-650 bf16 attention TFLOP/s against ~450-900 GB/s of NVLink per
GPU), all-gather otherwise. bf16 causal with Hq == Hkv: ring from 2048
tokens per device; GQA 4:1: from 512. Pass `strategy=` to override.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from jax_fastattn import masks, merge_partials

from . import context_schedule as schedule_lib
from .context_block import block_attention, block_backward, empty_result
from .context_schedule import LAYOUTS, from_zigzag, layout_order, to_zigzag  # noqa: F401  (re-exported)

__all__ = ["context_parallel_attention", "choose_strategy", "to_zigzag", "from_zigzag", "layout_order",
           "RING_MIN_INTENSITY"]

STRATEGIES = ("auto", "ring", "all_gather")
INPUT_ORDERS = ("natural", "zigzag")
RING_MIN_INTENSITY = 1024.0
# Partial results one query chunk may hold unmerged (bytes of outs and lses);
# past it they are merged into one float32 part. 1 GiB: all of a step's
# parts up to ~16K tokens per device (Hq = 32, D = 128), a bounded fraction
# of an 80 GB device beyond that.
PENDING_MERGE_BYTES = 1 << 30


def choose_strategy(seq_len: int, q_heads: int, kv_heads: int, num_devices: int, *, causal: bool = True,
                    dtype_bytes: int = 2, min_intensity: float = RING_MIN_INTENSITY) -> str:
    """"ring" or "all_gather" by the cost rule in the module docstring."""
    if num_devices <= 1:
        return "all_gather"
    intensity = 2.0 * seq_len * q_heads / (num_devices * kv_heads * dtype_bytes)
    if causal:
        intensity /= 2.0
    return "ring" if intensity >= min_intensity else "all_gather"


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one call (hashable: a custom_vjp nondiff arg)."""

    axis: str
    num_devices: int
    layout: str
    chunk_len: int
    band: tuple            # global (lo, hi), None = unbounded
    schedule: Optional[schedule_lib.RingSchedule]
    softmax_scale: float
    backend: str
    reorder: bool          # inputs in natural order: permute into zig-zag on device and back

    @property
    def slots(self) -> int:
        return schedule_lib.chunks_per_device(self.layout)

    @property
    def positions(self) -> np.ndarray:
        return schedule_lib.chunk_positions(self.layout, self.num_devices)


# ----------------------------------------------------------------------------
# Moving blocks between devices


def _shift(tree, plan: _Plan, hops: int):
    """Sends every device's buffers `hops` places along the ring (r -> r + hops)."""
    hops %= plan.num_devices
    if hops == 0:
        return tree
    perm = [(r, (r + hops) % plan.num_devices) for r in range(plan.num_devices)]
    return jax.tree.map(lambda x: lax.ppermute(x, plan.axis, perm), tree)


def _to_zigzag_local(x, plan: _Plan, seq_axis: int):
    """Natural order (device r holds chunks 2r, 2r+1) -> zig-zag (chunks r,
    2N-1-r) with two ppermutes: chunk c goes to device c if c < N, else
    2N-1-c. Each device receives one even and one odd chunk (r + (2N-1-r)
    is odd); which is its first slot depends on r's parity."""
    n = plan.num_devices
    dest = lambda c: c if c < n else 2 * n - 1 - c  # noqa: E731
    first, second = jnp.split(x, 2, axis=seq_axis)
    from_even = lax.ppermute(first, plan.axis, [(s, dest(2 * s)) for s in range(n)])
    from_odd = lax.ppermute(second, plan.axis, [(s, dest(2 * s + 1)) for s in range(n)])
    rank_even = lax.axis_index(plan.axis) % 2 == 0
    return jnp.concatenate([jnp.where(rank_even, from_even, from_odd),
                            jnp.where(rank_even, from_odd, from_even)], axis=seq_axis)


def _from_zigzag_local(x, plan: _Plan, seq_axis: int):
    """Inverse of `_to_zigzag_local`: the even chunk of device r's pair goes
    back to slot 0 of device chunk // 2, the odd one to slot 1."""
    n = plan.num_devices
    first, second = jnp.split(x, 2, axis=seq_axis)
    rank_even = lax.axis_index(plan.axis) % 2 == 0
    even_chunk = jnp.where(rank_even, first, second)
    odd_chunk = jnp.where(rank_even, second, first)
    even_index = lambda r: r if r % 2 == 0 else 2 * n - 1 - r  # noqa: E731
    odd_index = lambda r: 2 * n - 1 - r if r % 2 == 0 else r  # noqa: E731
    to_slot0 = lax.ppermute(even_chunk, plan.axis, [(r, even_index(r) // 2) for r in range(n)])
    to_slot1 = lax.ppermute(odd_chunk, plan.axis, [(r, odd_index(r) // 2) for r in range(n)])
    return jnp.concatenate([to_slot0, to_slot1], axis=seq_axis)


def _slot(x, plan: _Plan, index: int, axis: int = 1):
    if x is None:
        return None
    return lax.slice_in_dim(x, index * plan.chunk_len, (index + 1) * plan.chunk_len, axis=axis)


def _ids_may_meet(q_ids, kv_ids):
    """Whether any row's ranges of non-negative ids overlap (exact for sorted
    ids, as packed documents are; otherwise only a cheap over-estimate)."""
    big = jnp.int32(2**31 - 1)
    q_low = jnp.min(jnp.where(q_ids >= 0, q_ids, big), axis=1)
    q_high = jnp.max(jnp.where(q_ids >= 0, q_ids, -1), axis=1)
    kv_low = jnp.min(jnp.where(kv_ids >= 0, kv_ids, big), axis=1)
    kv_high = jnp.max(jnp.where(kv_ids >= 0, kv_ids, -1), axis=1)
    return jnp.any((q_low <= kv_high) & (kv_low <= q_high))


def _pair_branches(plan: _Plan, table, step: int, a: int, b: int, q_ids, kv_ids):
    """The bands one pair can see on any device (as indices into
    schedule.bands) and which of them this device runs: a Python int when
    every device runs the same one and no ids decide at run time, else a
    traced index into the returned list (only the bands that occur are
    compiled)."""
    column = plan.schedule.branch_array()[:, step, a, b]
    used = sorted(set(int(x) for x in column) | ({0} if q_ids is not None else set()))
    if len(used) == 1:
        return used, 0
    lookup = np.zeros(len(plan.schedule.bands), np.int32)
    lookup[used] = np.arange(len(used))
    index = jnp.asarray(lookup)[table[step, a, b]]
    if q_ids is not None:
        index = jnp.where(_ids_may_meet(q_ids, kv_ids), index, used.index(0))
    return used, index


def _run_pair(fn, plan: _Plan, used, index, *args):
    """Calls `fn(*args, band=...)` for the pair's band (a switch if it varies)."""
    branches = [functools.partial(fn, band=plan.schedule.bands[u], softmax_scale=plan.softmax_scale,
                                  backend=plan.backend) for u in used]
    if isinstance(index, int):
        return branches[index](*args)
    return lax.switch(index, branches, *args)


# ----------------------------------------------------------------------------
# Ring: forward and backward


def _join(k, v):
    """K and V of a device as one buffer [B, 2 L, Hkv, D] (K's rows, then V's),
    so that a ring step sends one collective-permute, not two: XLA's GPU
    scheduler keeps one collective in flight, and a second would wait
    behind the first instead of overlapping the step's compute."""
    return jnp.concatenate([k, v], axis=1)


def _split(kv):
    half = kv.shape[1] // 2
    return lax.slice_in_dim(kv, 0, half, axis=1), lax.slice_in_dim(kv, half, 2 * half, axis=1)


def _add_to_slot(acc, grad, plan: _Plan, index: int):
    """acc [B, 2 L, ...] with grad added to its chunk-sized rows number `index`."""
    begin = index * plan.chunk_len
    current = lax.slice_in_dim(acc, begin, begin + plan.chunk_len, axis=1)
    return lax.dynamic_update_slice_in_dim(acc, current + grad, begin, axis=1)


def _after(results, travelling):
    """`travelling` made to depend on `results` (an optimization barrier).

    The K/V transfer for ring step t is issued on the blocks of step t-1 and
    tied to what step t-2 computed: so it starts no earlier than step t-2's
    end and runs while step t-1 computes. Without the tie nothing orders the
    chain of ppermutes against the compute, and XLA's GPU scheduler issues
    every step's transfer back to back before the first block is computed:
    no overlap, and every device holding all N K/V blocks at once."""
    if not results:
        return travelling
    return lax.optimization_barrier((results, travelling))[1]


def _part_bytes(part) -> int:
    out, lse = part
    return out.size * out.dtype.itemsize + lse.size * lse.dtype.itemsize


def _merged(parts, out_dtype):
    if len(parts) == 1:
        return parts[0][0].astype(out_dtype), parts[0][1]
    outs, lses = zip(*parts)
    return merge_partials(outs, lses, out_dtype=out_dtype)


def _ring_forward(plan: _Plan, q, k, v, q_ids, kv_ids):
    sched = plan.schedule
    table = jnp.asarray(sched.branch_array())[lax.axis_index(plan.axis)]    # [steps, m, m]
    pending = [[] for _ in range(plan.slots)]   # per query chunk: (out, lse) parts not merged yet
    step_results = []                           # per ring step: what its pairs computed
    travelling, held = (_join(k, v), kv_ids), 0
    for i, step in enumerate(sched.steps):
        travelling = _after(step_results[i - 2] if i >= 2 else None, travelling)
        travelling, held = _shift(travelling, plan, step - held), step
        # Steps compute in ring order: otherwise step 0, which needs no
        # transfer, may be scheduled last and leave the first transfer bare.
        travelling = _after(step_results[i - 1] if i >= 1 else None, travelling)
        (k_now, v_now), kv_ids_now = _split(travelling[0]), travelling[1]
        step_results.append([])
        for a in range(plan.slots):
            q_a, q_ids_a = _slot(q, plan, a), _slot(q_ids, plan, a)
            for b in range(plan.slots):
                args = (q_a, _slot(k_now, plan, b), _slot(v_now, plan, b), q_ids_a, _slot(kv_ids_now, plan, b))
                used, index = _pair_branches(plan, table, i, a, b, q_ids_a, args[4])
                if used == [0]:
                    continue
                pending[a].append(_run_pair(block_attention, plan, used, index, *args))
                step_results[-1].append(pending[a][-1])
            if len(pending[a]) > 1 and sum(map(_part_bytes, pending[a])) > PENDING_MERGE_BYTES:
                pending[a] = [_merged(pending[a], jnp.float32)]
    acc = [_merged(parts, q.dtype) if parts else empty_result(_slot(q, plan, a))
           for a, parts in enumerate(pending)]
    out = jnp.concatenate([o for o, _ in acc], axis=1).astype(q.dtype)
    lse = jnp.concatenate([l for _, l in acc], axis=2)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(plan, q, k, v, q_ids, kv_ids):
    return _ring_forward(plan, q, k, v, q_ids, kv_ids)


def _ring_fwd(plan, q, k, v, q_ids, kv_ids):
    out, lse = _ring_forward(plan, q, k, v, q_ids, kv_ids)
    return (out, lse), (q, k, v, q_ids, kv_ids, out, lse)


def _ring_bwd(plan, residuals, cotangents):
    q, k, v, q_ids, kv_ids, out, lse = residuals
    d_out, d_lse = cotangents
    sched = plan.schedule
    table = jnp.asarray(sched.branch_array())[lax.axis_index(plan.axis)]
    d_q = [jnp.zeros(_slot(q, plan, a).shape, jnp.float32) for a in range(plan.slots)]
    # dK/dV accumulators (f32, joined as K/V are) travel with the K/V they belong to.
    d_kv = jnp.zeros((k.shape[0], 2 * k.shape[1]) + k.shape[2:], jnp.float32)
    travelling, held = (_join(k, v), kv_ids), 0
    step_results = []   # per ring step: the dQ of each pair it ran, in order
    for i, step in enumerate(sched.steps):
        # Two transfers share a step's compute here: the dK/dV accumulators
        # for this step (sent once the previous step's gradients are added)
        # and the K/V for the next step. With one collective in flight, the
        # K/V transfer is tied to the previous step's first pair, so the
        # accumulators' transfer overlaps that pair and the K/V transfer
        # the rest (tied to a whole step, the accumulators would wait).
        travelling = _after(step_results[i - 1][:1] if i >= 1 else None, travelling)
        travelling = _shift(travelling, plan, step - held)
        d_kv = _shift(d_kv, plan, step - held)
        held = step
        (k_now, v_now), kv_ids_now = _split(travelling[0]), travelling[1]
        kv_grads = []
        step_results.append([])
        for a in range(plan.slots):
            q_a, q_ids_a = _slot(q, plan, a), _slot(q_ids, plan, a)
            merged = (_slot(out, plan, a), _slot(lse, plan, a, axis=2), _slot(d_out, plan, a),
                      _slot(d_lse, plan, a, axis=2))
            for b in range(plan.slots):
                args = (q_a, _slot(k_now, plan, b), _slot(v_now, plan, b), q_ids_a, _slot(kv_ids_now, plan, b))
                used, index = _pair_branches(plan, table, i, a, b, q_ids_a, args[4])
                if used == [0]:
                    continue
                g_q, g_k, g_v = _run_pair(block_backward, plan, used, index, *args, *merged)
                d_q[a] = d_q[a] + g_q
                kv_grads.append((b, g_k, g_v))
                step_results[-1].append(g_q)
        # Added only after the step's pairs: the dK/dV accumulators arriving
        # for this step are then needed only here, and their transfer runs
        # while the pairs compute.
        for b, g_k, g_v in kv_grads:
            d_kv = _add_to_slot(d_kv, g_k, plan, b)
            d_kv = _add_to_slot(d_kv, g_v, plan, plan.slots + b)
    d_kv = _shift(d_kv, plan, -held)   # device r holds the gradients of device r - held: send them home
    d_k, d_v = _split(d_kv)
    return jnp.concatenate(d_q, axis=1).astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


# ----------------------------------------------------------------------------
# All-gather


def _device_attention(plan: _Plan, rank: int, q, k, v, q_ids, kv_ids):
    """Device `rank`'s local queries against all keys (natural order): one
    kernel call per local chunk, over the key range its band can see."""
    seq_len = k.shape[1]
    lo, hi = plan.band
    outs, lses = [], []
    for a in range(plan.slots):
        q_start = int(plan.positions[rank, a]) * plan.chunk_len
        kv_start = 0 if lo is None else min(max(0, q_start + lo), seq_len)
        kv_end = seq_len if hi is None else max(0, min(seq_len, q_start + plan.chunk_len + hi))
        band = None
        if kv_end > kv_start:
            band = schedule_lib.block_band(lo, hi, kv_start - q_start, plan.chunk_len, kv_end - kv_start)
        kv_ids_part = None if kv_ids is None else kv_ids[:, kv_start:kv_end]
        o, l = block_attention(_slot(q, plan, a), k[:, kv_start:kv_end], v[:, kv_start:kv_end],
                               _slot(q_ids, plan, a), kv_ids_part, band, plan.softmax_scale, plan.backend)
        outs.append(o)
        lses.append(l)
    return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gathered(plan, q, k, v, q_ids, kv_ids):
    branches = [functools.partial(_device_attention, plan, r) for r in range(plan.num_devices)]
    return lax.switch(lax.axis_index(plan.axis), branches, q, k, v, q_ids, kv_ids)


def _gathered_fwd(plan, q, k, v, q_ids, kv_ids):
    # Residuals are the inputs only: a switch's own linearisation would keep
    # every branch's residuals; the backward recomputes the one that ran.
    return _gathered(plan, q, k, v, q_ids, kv_ids), (q, k, v, q_ids, kv_ids)


def _gathered_bwd(plan, residuals, cotangents):
    q, k, v, q_ids, kv_ids = residuals

    def branch(rank, q, k, v, q_ids, kv_ids, cotangents):
        _, vjp = jax.vjp(lambda q, k, v: _device_attention(plan, rank, q, k, v, q_ids, kv_ids), q, k, v)
        return vjp(cotangents)

    branches = [functools.partial(branch, r) for r in range(plan.num_devices)]
    d_q, d_k, d_v = lax.switch(lax.axis_index(plan.axis), branches, q, k, v, q_ids, kv_ids, cotangents)
    return d_q, d_k, d_v, None, None


_gathered.defvjp(_gathered_fwd, _gathered_bwd)


def _gather_natural(x, plan: _Plan):
    """All-gathers the sequence axis (1) and puts the chunks in natural order."""
    if x is None:
        return None
    gathered = lax.all_gather(x, plan.axis, axis=1, tiled=True)
    chunks = plan.num_devices * plan.slots
    natural = np.argsort(plan.positions.reshape(-1))
    split = gathered.reshape(gathered.shape[:1] + (chunks, plan.chunk_len) + gathered.shape[2:])
    return jnp.take(split, natural, axis=1).reshape(gathered.shape)


# ----------------------------------------------------------------------------
# Per-device body and the public function


def _local(plan: _Plan, strategy: str, q, k, v, ids):
    q_ids, kv_ids = ids.get("q_ids"), ids.get("kv_ids")
    if plan.reorder:
        q, k, v = (_to_zigzag_local(x, plan, 1) for x in (q, k, v))
        q_ids, kv_ids = (None if x is None else _to_zigzag_local(x, plan, 1) for x in (q_ids, kv_ids))
    if strategy == "ring":
        out, lse = _ring(plan, q, k, v, q_ids, kv_ids)
    else:
        out, lse = _gathered(plan, q, _gather_natural(k, plan), _gather_natural(v, plan), q_ids,
                             _gather_natural(kv_ids, plan))
    if plan.reorder:
        out, lse = _from_zigzag_local(out, plan, 1), _from_zigzag_local(lse, plan, 2)
    return out, lse


def _band_of(plan: masks.MaskPlan):
    lo = None if plan.band_lo <= -masks.UNBOUNDED else int(plan.band_lo)
    hi = None if plan.band_hi >= masks.UNBOUNDED else int(plan.band_hi)
    return lo, hi


def _check(q, k, v, mesh, axis, batch_axis, strategy, layout, input_order):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if np.ndim(x) != 4:
            raise ValueError(f"{name} must have rank 4 [B, S, H, D], got shape {np.shape(x)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must agree on batch and head dim, got {q.shape} and {k.shape}")
    if q.shape[1] != k.shape[1]:
        raise ValueError("context_parallel_attention is self-attention over one sharded sequence: q and k must "
                         f"have the same sequence length, got {q.shape[1]} and {k.shape[1]}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"q heads ({q.shape[2]}) must be a multiple of k/v heads ({k.shape[2]})")
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis not in mesh.axis_names:
        raise ValueError(f"axis must be one of the mesh axes {mesh.axis_names}, got {axis!r}")
    if batch_axis is not None and (batch_axis not in mesh.axis_names or batch_axis == axis):
        raise ValueError(f"batch_axis must be None or a mesh axis other than axis={axis!r} "
                         f"(mesh axes {mesh.axis_names}), got {batch_axis!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if input_order not in INPUT_ORDERS:
        raise ValueError(f"input_order must be one of {INPUT_ORDERS}, got {input_order!r}")
    if input_order == "zigzag" and layout != "zigzag":
        raise ValueError(f"input_order='zigzag' needs layout='zigzag', got layout={layout!r}")


def context_parallel_attention(q, k, v, *, mesh: Mesh, axis: str, causal: bool = False,
                               mask: Optional[masks.Mask] = None, softmax_scale: Optional[float] = None,
                               strategy: str = "auto", layout: str = "zigzag", input_order: str = "natural",
                               batch_axis: Optional[str] = None, return_lse: bool = False,
                               backend: str = "auto"):
    """Self-attention with the sequence axis sharded over mesh axis `axis`.

    Args:
      q: [B, S, Hq, D]; k, v: [B, S, Hkv, D] (any sharding; inside the call
        the sequence axis is split over `axis`, the batch over `batch_axis`).
      mesh, axis: the mesh and its axis the sequence is split over (N devices).
      causal, mask: as `flash_attention` (Causal, SlidingWindow, Segments and
        their `&`; Dense masks and bias are not supported). Segment ids are
        split along with the sequence; key ids travel with K/V.
      strategy: "ring", "all_gather" or "auto" (`choose_strategy`).
      layout: "zigzag" (device r holds chunks r and 2N-1-r of 2N: equal work
        under causal masks) or "contiguous" (chunk r of N).
      input_order: "natural" (tokens in order; any length: padded to a
        multiple of 2N (zigzag) or N with padded keys masked, and moved into
        the layout on device by ppermute) or "zigzag" (already permuted with
        `to_zigzag`, length a multiple of 2N; output in the same order).
      return_lse: also return the f32 log-sum-exp [B, Hq, S].
      backend: the per-block kernel, as `flash_attention`'s `backend`.

    Returns out [B, S, Hq, D] (and lse), differentiable in q, k, v.
    """
    _check(q, k, v, mesh, axis, batch_axis, strategy, layout, input_order)
    batch, seq_len, q_heads, head_dim = q.shape
    num_devices = mesh.shape[axis]
    mask_plan = masks.make_plan(mask, bool(causal), batch, q_heads, seq_len, seq_len)
    if mask_plan.dense is not None:
        raise ValueError("mask: context_parallel_attention supports Causal, SlidingWindow and Segments "
                         "(and their &), not Dense masks")
    lo, hi = _band_of(mask_plan)
    q_ids, kv_ids = mask_plan.q_segment_ids, mask_plan.kv_segment_ids
    if strategy == "auto":
        strategy = choose_strategy(seq_len, q_heads, k.shape[2], num_devices, causal=hi is not None and hi <= 0,
                                   dtype_bytes=jnp.dtype(k.dtype).itemsize)
    chunks = schedule_lib.chunks_per_device(layout) * num_devices
    padded_len = -(-seq_len // chunks) * chunks
    if padded_len != seq_len:
        if input_order == "zigzag":
            raise ValueError(f"input_order='zigzag' needs a sequence length that is a multiple of {chunks} "
                             f"(2 x {num_devices} devices), got {seq_len}: pad before `to_zigzag`")
        pad = padded_len - seq_len
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        if q_ids is None and (hi is None or hi > 0):   # padded keys visible to real queries: mask them
            q_ids = kv_ids = jnp.zeros((batch, seq_len), jnp.int32)
        if q_ids is not None:
            q_ids, kv_ids = (jnp.pad(x, ((0, 0), (0, pad)), constant_values=-1) for x in (q_ids, kv_ids))
    chunk_len = padded_len // chunks
    ring_schedule = (schedule_lib.build_ring_schedule(layout, num_devices, chunk_len, lo, hi)
                     if strategy == "ring" else None)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    plan = _Plan(axis, num_devices, layout, chunk_len, (lo, hi), ring_schedule, scale, backend,
                 reorder=layout == "zigzag" and input_order == "natural" and num_devices > 1)
    ids = {} if q_ids is None else {"q_ids": q_ids, "kv_ids": kv_ids}
    seq_spec, ids_spec = P(batch_axis, axis, None, None), P(batch_axis, axis)
    run = jax.shard_map(functools.partial(_local, plan, strategy), mesh=mesh,
                        in_specs=(seq_spec, seq_spec, seq_spec, {name: ids_spec for name in ids}),
                        out_specs=(seq_spec, P(batch_axis, None, axis)), check_vma=False)
    out, lse = run(q, k, v, ids)
    if padded_len != seq_len:
        out, lse = out[:, :seq_len], lse[:, :, :seq_len]
    return (out, lse) if return_lse else out
