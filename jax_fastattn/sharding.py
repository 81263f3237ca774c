"""How the custom calls partition across devices and batch under vmap.

Layering (as jax's own cuDNN attention wrapper): the public custom_vjp calls
`forward_call` / `backward_call`, which are

    custom_vmap (fold a vmapped axis into the batch axis)
      -> custom_partitioning (Shardy rule + partition callback)
        -> jax.ffi.ffi_call (ffi.py)

Partitioning: batch and head axes split with no communication; the head
sharding of q and k/v must agree on kv heads (q head h reads kv head
h // group, so q's head axis is the compound factor (kv_heads, group), kv
major). The group factor, both sequence axes and the head dim are
need-replication factors: a sharded q/k/v sequence axis is gathered before
the call (never computed on a shard of the keys), and a head sharding that
does not divide the kv heads falls back to fewer head shards (XLA reshards).
Per-shard calls see local shapes; the band mask is expressed relative to
positions, which a replicated sequence axis leaves unchanged.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import (ArrayMapping, CompoundFactor, SdyShardingRule,
                                                  custom_partitioning)
from jax.sharding import NamedSharding, PartitionSpec as P

from . import ffi

# One layout per argument and result, by its own name: the factors of its
# dims, left to right. "(k g)" is a q-side head axis: q head h reads kv head
# h // g, so it splits kv-major into kv heads k and the group g. b batch, s
# query positions, t key positions, d head dim, nq/nk plan tiles, p cache
# pages, mp pages per row, w a workspace axis. Both the Shardy rule and the
# PartitionSpecs of the partition callback are derived from these strings.
LAYOUTS = {
    # attention forward
    "q": "b s (k g) d", "k": "b t k d", "v": "b t k d",
    "bias": "b (k g) s t", "q_ids": "b s", "kv_ids": "b t", "dense": "b (k g) s t",
    "tile_class": "b (k g) nq nk",
    "out": "b s (k g) d", "lse": "b (k g) s",
    "work_counter": "b (k g) w",     # CUDA: the dynamic scheduler's counter, one per shard
    # attention backward
    "d_out": "b s (k g) d", "d_lse": "b (k g) s",
    "d_q": "b s (k g) d", "d_k": "b t k d", "d_v": "b t k d", "d_bias": "b (k g) s t",
    "delta": "b (k g) s",            # CUDA: rowsum(d_out * out), the kernels' workspace
    "dq_accum": "b (k g) w",         # CUDA: the fused wgmma backward's float32 dQ sums
    "dq_turns": "b (k g) w",         # CUDA: their order flags, one per q tile
    # decode
    "decode_q": "b (k g) d", "k_cache": "b t k d", "v_cache": "b t k d",
    "k_pages": "p t k d", "v_pages": "p t k d", "lengths": "b", "page_table": "b mp",
    "decode_out": "b (k g) d", "decode_lse": "b (k g)",
    "split_partials": "b (k g) w",   # CUDA: the split-KV partials (out, max, sum) per split
}
# Arguments whose batch and head dims may be 1 (broadcast) instead of B, Hq.
_BROADCASTABLE = {"bias", "dense", "tile_class"}
# Factors never split: a sharded sequence axis is gathered before the call.
_REPLICATED_FACTORS = ("s", "t", "g", "d", "nq", "nk", "p", "mp", "w")
_SHARDED_FACTORS = ("b", "k")

FORWARD_ARGS = ("q", "k", "v", "bias", "q_ids", "kv_ids", "dense", "tile_class")
BACKWARD_ARGS = ("q", "k", "v", "out", "lse", "d_out", "d_lse", "bias", "q_ids", "kv_ids", "dense",
                 "tile_class")
DECODE_ARGS = ("decode_q", "k_cache", "v_cache", "lengths", "page_table")
DECODE_PAGED_ARGS = ("decode_q", "k_pages", "v_pages", "lengths", "page_table")


def _parse(layout: str) -> list:
    """'b s (k g) d' -> [('b',), ('s',), ('k', 'g'), ('d',)]."""
    dims, group = [], None
    for token in layout.replace("(", " ( ").replace(")", " ) ").split():
        if token == "(":
            group = []
        elif token == ")":
            dims.append(tuple(group))
            group = None
        elif group is not None:
            group.append(token)
        else:
            dims.append((token,))
    return dims


_PARSED = {name: _parse(layout) for name, layout in LAYOUTS.items()}


def _is_absent(shape) -> bool:
    return len(shape) == 1 and shape[0] == 0


def _is_broadcast(name: str, dim: tuple, size: int, batch: int, q_heads: int) -> bool:
    """A size-1 batch or head dim of a broadcastable argument."""
    if name not in _BROADCASTABLE:
        return False
    return (dim == ("b",) and size != batch) or (dim == ("k", "g") and size != q_heads)


# ----------------------------------------------------------------------------
# Shardy rule


def _shape(value_type) -> tuple:
    return tuple(value_type.shape)


def _head_factor(q_heads: int, kv_heads: int, heads_split: bool):
    """The factor of a '(k g)' dim. A size-1 part cannot be in a compound;
    a head count some mesh axis does not divide gets a factor of its own
    ("h"), unlinked from k/v, so that no sub-axis sharding of the kv heads
    can propagate through a compound factor (both then stay replicated)."""
    if not heads_split:
        return "h"
    if q_heads == kv_heads:
        return "k"
    if kv_heads == 1:
        return "g"
    return CompoundFactor("k", "g")


def _mapping(name: str, shape: tuple, batch: int, q_heads: int, heads, unique: str) -> ArrayMapping:
    """Factors of one argument from its layout. Broadcast dims and absent
    (empty) inputs get factors of their own, never sharded."""
    if _is_absent(shape):
        return ArrayMapping(f"{unique}0")
    factors = []
    for i, (dim, size) in enumerate(zip(_PARSED[name], shape)):
        if _is_broadcast(name, dim, size, batch, q_heads):
            factors.append(f"{unique}{i}")
        elif dim == ("k", "g"):
            factors.append(heads)
        elif dim == ("k",) and heads == "h":
            factors.append("k")
        else:
            factors.append(dim[0])
    return ArrayMapping(*factors)


def _sizes(arg_names, shapes):
    """(batch, q heads, kv heads) of a call, from its first two arguments
    (q and k, or decode's q and k cache)."""
    q_dims = _PARSED[arg_names[0]]
    q_heads = shapes[0][q_dims.index(("k", "g"))]
    return shapes[0][0], q_heads, shapes[1][2]


def _splits_evenly(mesh, size: int) -> bool:
    """True if every mesh axis divides `size`. Otherwise Shardy may shard the
    dim over a sub-axis, which custom_partitioning cannot express as a
    PartitionSpec; such dims are kept replicated (XLA reshards)."""
    axis_sizes = dict(mesh.shape).values() if mesh is not None else ()
    return all(size % n == 0 for n in axis_sizes)


def sharding_rule(arg_names: Sequence[str], result_names: Sequence[str], value_types, result_types,
                  mesh=None):
    """SdyShardingRule for a call whose arguments are named by arg_names."""
    shapes = [_shape(t) for t in value_types]
    batch, q_heads, kv_heads = _sizes(arg_names, shapes)
    heads_split = _splits_evenly(mesh, kv_heads)
    heads = _head_factor(q_heads, kv_heads, heads_split)
    operands = tuple(_mapping(n, s, batch, q_heads, heads, f"x{i}_")
                     for i, (n, s) in enumerate(zip(arg_names, shapes)))
    results = tuple(_mapping(n, _shape(t), batch, q_heads, heads, f"y{i}_")
                    for i, (n, t) in enumerate(zip(result_names, result_types)))
    # Factors in order of first appearance: Shardy wants special factors
    # listed in that (index) order.
    order = list(dict.fromkeys(f for m in operands + results for dim in m
                               for f in ((dim,) if isinstance(dim, str) else dim)))
    replicated = set(_REPLICATED_FACTORS)
    if not _splits_evenly(mesh, batch):
        replicated.add("b")
    if not heads_split:
        replicated.update(("k", "h"))
    sizes = {"g": q_heads // kv_heads} if isinstance(heads, CompoundFactor) else {}
    return SdyShardingRule(operands, results,
                           need_replication_factors=tuple(f for f in order if f in replicated),
                           **sizes)


# ----------------------------------------------------------------------------
# Partition callback (shared by Shardy and GSPMD)


def _axes_size(mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[a] for a in axes)


def _spec_entry(spec, i):
    return spec[i] if i < len(spec) else None


def choose_axes(mesh, q_sharding, batch: int, kv_heads: int, head_dim_index: int = 2):
    """Mesh axes for the batch and head dims, taken from q's sharding and
    dropped where they do not divide the sizes (then XLA reshards)."""
    spec = q_sharding.spec if isinstance(q_sharding, NamedSharding) else P()
    batch_axes, head_axes = _spec_entry(spec, 0), _spec_entry(spec, head_dim_index)
    if batch % _axes_size(mesh, batch_axes) != 0:
        batch_axes = None
    if kv_heads % _axes_size(mesh, head_axes) != 0:
        head_axes = None
    return batch_axes, head_axes


def _spec_for(name: str, shape: tuple, batch: int, q_heads: int, batch_axes, head_axes) -> P:
    """PartitionSpec of one argument from its layout: batch axes on 'b',
    head axes on 'k' and '(k g)', nothing elsewhere."""
    if _is_absent(shape):
        return P(None)
    axes = {("b",): batch_axes, ("k",): head_axes, ("k", "g"): head_axes}
    return P(*(None if _is_broadcast(name, dim, size, batch, q_heads) else axes.get(dim)
               for dim, size in zip(_PARSED[name], shape)))


def _shardings(mesh, names, shapes, batch, q_heads, batch_axes, head_axes):
    return tuple(NamedSharding(mesh, _spec_for(n, s, batch, q_heads, batch_axes, head_axes))
                 for n, s in zip(names, shapes))


def _partitioned(raw_call, arg_names, result_names):
    """custom_partitioning around raw_call(*arrays) -> tuple of arrays."""

    @custom_partitioning
    def call(*args):
        return raw_call(*args)

    def plan(mesh, arg_shapes, result_shapes):
        shapes = [tuple(a.shape) for a in arg_shapes]
        batch, q_heads, kv_heads = _sizes(arg_names, shapes)
        head_index = _PARSED[arg_names[0]].index(("k", "g"))
        batch_axes, head_axes = choose_axes(mesh, arg_shapes[0].sharding, batch, kv_heads, head_index)
        args = _shardings(mesh, arg_names, shapes, batch, q_heads, batch_axes, head_axes)
        results = _shardings(mesh, result_names, [tuple(r.shape) for r in result_shapes], batch, q_heads,
                             batch_axes, head_axes)
        return args, results

    def infer_sharding_from_operands(mesh, arg_shapes, result_shapes):
        return plan(mesh, arg_shapes, result_shapes)[1]

    def partition(mesh, arg_shapes, result_shapes):
        args, results = plan(mesh, arg_shapes, result_shapes)
        return mesh, raw_call, results, args

    call.def_partition(
        partition=partition,
        infer_sharding_from_operands=infer_sharding_from_operands,
        sharding_rule=lambda mesh, value_types, result_types: sharding_rule(
            arg_names, result_names, value_types, result_types, mesh))
    return call


# ----------------------------------------------------------------------------
# vmap: fold the vmapped axis into the batch axis


def _fold_vmap_axis(args, batched, names, axis_size):
    full_batch = next(x.shape[1] if b else x.shape[0]
                      for x, b, n in zip(args, batched, names) if n not in _BROADCASTABLE)
    folded = []
    for x, is_batched, name in zip(args, batched, names):
        if ffi.is_absent(x) and not is_batched:
            folded.append(x)
            continue
        if is_batched:
            if x.shape[1] != full_batch:
                x = jnp.broadcast_to(x, (axis_size, full_batch) + x.shape[2:])
        else:
            if name in _BROADCASTABLE and x.shape[0] == 1:
                folded.append(x)
                continue
            x = jnp.broadcast_to(x[None], (axis_size,) + x.shape)
        folded.append(x.reshape((axis_size * x.shape[1],) + x.shape[2:]))
    return folded


def _batched(call, names):
    wrapped = jax.custom_batching.custom_vmap(call)

    @wrapped.def_vmap
    def rule(axis_size, in_batched, *args):
        results = wrapped(*_fold_vmap_axis(args, in_batched, names, axis_size))
        unfold = lambda r: r.reshape((axis_size, r.shape[0] // axis_size) + r.shape[1:])
        outs = tuple(r if ffi.is_absent(r) else unfold(r) for r in results)
        return outs, tuple(not ffi.is_absent(r) for r in results)

    return wrapped


def _varying_axes(x) -> frozenset:
    """Manual mesh axes x varies over inside shard_map (jax >= 0.10 keeps
    them in `manual_axis_type.varying`, older releases in `vma`)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)
    if manual is not None:
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", ()))


def vary_like(arrays, *refs):
    """Inside shard_map, casts each array to vary over every manual mesh axis
    that any of `refs` varies over (loop carries created with jnp.zeros are
    invariant, while the loop body's results vary as its inputs do; lax.switch
    and fori_loop need both to agree). Outside shard_map, a no-op."""
    axes = frozenset().union(*(_varying_axes(r) for r in refs if r is not None))
    if not axes:
        return arrays
    cast = lambda x: (jax.lax.pcast(x, tuple(sorted(axes - _varying_axes(x))), to="varying")
                      if x is not None and axes - _varying_axes(x) else x)
    return tuple(cast(x) for x in arrays)


def _varying_like(call):
    """Inside shard_map, results vary over the manual mesh axes that any
    input varies over (the custom call itself carries no such type)."""

    def wrapped(*args):
        results = call(*args)
        axes = frozenset().union(*(_varying_axes(a) for a in args))
        if not axes:
            return results
        cast = lambda r: (jax.lax.pcast(r, tuple(sorted(axes - _varying_axes(r))), to="varying")
                          if axes - _varying_axes(r) else r)
        return tuple(cast(r) for r in results)

    return wrapped


@functools.lru_cache(maxsize=None)
def forward_call(platform: str, attrs: ffi.CallAttrs):
    """fn(q, k, v, bias, q_ids, kv_ids, dense, tile_class) -> (out, lse)."""
    raw = ffi.forward_ffi(platform, attrs)
    names = ("out", "lse") + (("work_counter",) if platform == "cuda" else ())
    call = _varying_like(_batched(_partitioned(raw, FORWARD_ARGS, names), FORWARD_ARGS))
    return lambda *args: call(*args)[:2]


@functools.lru_cache(maxsize=None)
def backward_call(platform: str, attrs: ffi.CallAttrs):
    """fn(q, k, v, out, lse, d_out, d_lse, bias, q_ids, kv_ids, dense,
    tile_class) -> (dq, dk, dv, dbias)."""
    raw = ffi.backward_ffi(platform, attrs)
    names = ("d_q", "d_k", "d_v", "d_bias") + (("delta", "dq_accum", "dq_turns") if platform == "cuda" else ())
    call = _varying_like(_batched(_partitioned(raw, BACKWARD_ARGS, names), BACKWARD_ARGS))
    return lambda *args: call(*args)[:4]


@functools.lru_cache(maxsize=None)
def decode_call(platform: str, softmax_scale: float, paged: bool, num_splits: int = 1, cpu_isa: str = "auto",
                cuda_decode: str = "auto"):
    """fn(q [B, Hq, D], k, v, lengths [B], page_table) -> (out, lse) or
    (out, lse, workspace) on CUDA. cpu_isa: the CPU kernel's level (CPU only);
    cuda_decode: the CUDA kernel (CUDA only)."""
    raw = ffi.decode_ffi(platform, softmax_scale, num_splits, cpu_isa=cpu_isa, cuda_decode=cuda_decode)
    names = ("decode_out", "decode_lse") + (("split_partials",) if platform == "cuda" else ())
    if paged:
        return _varying_like(_batched_paged(_partitioned(raw, DECODE_PAGED_ARGS, names)))
    return _varying_like(_batched(_partitioned(raw, DECODE_ARGS, names), DECODE_ARGS))


def _batched_paged(call):
    """vmap of a paged decode: each vmapped instance has its own page pool,
    so pools are concatenated and page tables offset into the joint pool."""
    wrapped = jax.custom_batching.custom_vmap(call)

    @wrapped.def_vmap
    def rule(axis_size, in_batched, q, k, v, lengths, page_table):
        def lead(x, batched):
            return x if batched else jnp.broadcast_to(x[None], (axis_size,) + x.shape)
        q, k, v, lengths, page_table = (lead(x, b) for x, b in zip((q, k, v, lengths, page_table), in_batched))
        pages = k.shape[1]
        offsets = (jnp.arange(axis_size, dtype=jnp.int32) * pages)[:, None, None]
        table = (page_table + offsets).reshape((-1,) + page_table.shape[2:])
        merge = lambda x: x.reshape((-1,) + x.shape[2:])
        results = wrapped(merge(q), merge(k), merge(v), merge(lengths), table)
        return tuple(r.reshape((axis_size, -1) + r.shape[1:]) for r in results), (True,) * len(results)

    return wrapped
