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

# Which inputs may keep a batch dim of 1 (broadcast) instead of B; the rest
# of the layout is fixed by the argument order of ffi.py.
FORWARD_ARGS = ("q", "k", "v", "bias", "q_ids", "kv_ids", "dense", "tile_class")
BACKWARD_ARGS = ("q", "k", "v", "out", "lse", "d_out", "d_lse", "bias", "q_ids", "kv_ids", "dense",
                 "tile_class")
_BROADCASTABLE = {"bias", "dense", "tile_class"}
_REPLICATED_FACTORS = ("s", "t", "g", "d", "nq", "nk", "p", "mp", "w")
DECODE_ARGS = ("dq", "dk", "dv", "lengths", "page_table")


# ----------------------------------------------------------------------------
# Shardy rule


def _shape(value_type) -> tuple:
    return tuple(value_type.shape)


def _head_factor(q_heads: int, kv_heads: int):
    """q's head dim: (k g) kv-major; a size-1 part cannot be in a compound."""
    if q_heads == kv_heads:
        return "k"
    if kv_heads == 1:
        return "g"
    return CompoundFactor("k", "g")


def _mapping(name: str, shape: tuple, batch: int, q_heads: int, heads, unique: str,
             paged: bool = False) -> ArrayMapping:
    """Factor names of one argument, by its role. Size-1 broadcast dims and
    absent (empty) inputs get factors of their own, never sharded."""
    if len(shape) == 1 and shape[0] == 0:
        return ArrayMapping(f"{unique}0")
    if name in ("q", "out", "d_out"):
        return ArrayMapping("b", "s", heads, "d")
    if name in ("dq", "dout"):  # decode: one token, [B, Hq, D]
        return ArrayMapping("b", heads, "d")
    if name in ("dk", "dv"):  # decode cache: contiguous [B, ...] or a pool of pages
        return ArrayMapping("p" if paged else "b", "t", "k", "d")
    if name == "lengths":
        return ArrayMapping("b")
    if name == "workspace":
        return ArrayMapping("b", heads, "w")
    if name == "page_table":
        return ArrayMapping("b", "mp")
    if name in ("k", "v"):
        return ArrayMapping("b", "t", "k", "d")
    if name in ("lse", "d_lse"):
        return ArrayMapping("b", heads, "s")
    if name == "q_ids":
        return ArrayMapping("b", "s")
    if name == "kv_ids":
        return ArrayMapping("b", "t")
    if name in ("bias", "dense", "d_bias"):
        b = "b" if shape[0] == batch else f"{unique}b"
        h = heads if shape[1] == q_heads else f"{unique}h"
        return ArrayMapping(b, h, "s", "t")
    if name == "tile_class":
        b = "b" if shape[0] == batch else f"{unique}b"
        h = heads if shape[1] == q_heads else f"{unique}h"
        return ArrayMapping(b, h, "nq", "nk")
    raise ValueError(name)


def _sizes(arg_names, shapes):
    """(batch, q heads, kv heads) of a call, from its q and k arguments."""
    q_shape, k_shape = shapes[0], shapes[1]
    q_heads = q_shape[1] if arg_names[0] == "dq" else q_shape[2]
    return q_shape[0], q_heads, k_shape[2]


def _is_paged(arg_names, shapes) -> bool:
    return any(n == "page_table" and s != (0,) for n, s in zip(arg_names, shapes))


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
    paged = _is_paged(arg_names, shapes)
    heads_split = _splits_evenly(mesh, kv_heads)
    # A head count some mesh axis does not divide: q heads get a factor of
    # their own ("h"), unlinked from k/v, so that no sub-axis sharding of the
    # kv heads can propagate through a compound factor; both stay replicated.
    heads = _head_factor(q_heads, kv_heads) if heads_split else "h"
    operands = tuple(_mapping(n, s, batch, q_heads, heads, f"x{i}_", paged)
                     for i, (n, s) in enumerate(zip(arg_names, shapes)))
    results = tuple(_mapping(n, _shape(t), batch, q_heads, heads, f"y{i}_", paged)
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


def _spec_for(name: str, shape: tuple, batch: int, q_heads: int, batch_axes, head_axes,
              paged: bool = False) -> P:
    if len(shape) == 1 and shape[0] == 0:
        return P(None)
    b = batch_axes if shape[0] == batch else None
    if name in ("dq", "dout", "workspace"):
        return P(batch_axes, head_axes, None)
    if name in ("dk", "dv"):
        return P(None if paged else batch_axes, None, head_axes, None)
    if name == "lengths":
        return P(batch_axes)
    if name == "page_table":
        return P(batch_axes, None)
    if name in ("q", "out", "d_out", "k", "v"):
        return P(batch_axes, None, head_axes, None)
    if name in ("lse", "d_lse"):
        return P(batch_axes, head_axes, None)
    if name in ("q_ids", "kv_ids"):
        return P(batch_axes, None)
    if name in ("bias", "dense", "tile_class", "d_bias"):
        return P(b, head_axes if shape[1] == q_heads else None, None, None)
    raise ValueError(name)


def _shardings(mesh, names, shapes, batch, q_heads, batch_axes, head_axes, paged):
    return tuple(NamedSharding(mesh, _spec_for(n, s, batch, q_heads, batch_axes, head_axes, paged))
                 for n, s in zip(names, shapes))


def _partitioned(raw_call, arg_names, result_names):
    """custom_partitioning around raw_call(*arrays) -> tuple of arrays."""

    @custom_partitioning
    def call(*args):
        return raw_call(*args)

    def plan(mesh, arg_shapes, result_shapes):
        shapes = [tuple(a.shape) for a in arg_shapes]
        batch, q_heads, kv_heads = _sizes(arg_names, shapes)
        paged = _is_paged(arg_names, shapes)
        head_dim = 1 if arg_names[0] == "dq" else 2
        batch_axes, head_axes = choose_axes(mesh, arg_shapes[0].sharding, batch, kv_heads, head_dim)
        args = _shardings(mesh, arg_names, shapes, batch, q_heads, batch_axes, head_axes, paged)
        results = _shardings(mesh, result_names, [tuple(r.shape) for r in result_shapes], batch, q_heads,
                             batch_axes, head_axes, paged)
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
    # CUDA's extra work counter is laid out as the decode workspace ([B, Hq, 1]).
    names = ("out", "lse") + (("workspace",) if platform == "cuda" else ())
    call = _varying_like(_batched(_partitioned(raw, FORWARD_ARGS, names), FORWARD_ARGS))
    return lambda *args: call(*args)[:2]


@functools.lru_cache(maxsize=None)
def backward_call(platform: str, attrs: ffi.CallAttrs):
    """fn(q, k, v, out, lse, d_out, d_lse, bias, q_ids, kv_ids, dense,
    tile_class) -> (dq, dk, dv, dbias)."""
    raw = ffi.backward_ffi(platform, attrs)
    # CUDA's extra delta workspace is laid out like lse ([B, Hq, Sq]).
    names = ("q", "k", "v", "d_bias") + (("lse",) if platform == "cuda" else ())
    call = _varying_like(_batched(_partitioned(raw, BACKWARD_ARGS, names), BACKWARD_ARGS))
    return lambda *args: call(*args)[:4]


@functools.lru_cache(maxsize=None)
def decode_call(platform: str, softmax_scale: float, paged: bool, num_splits: int = 1):
    """fn(q [B, Hq, D], k, v, lengths [B], page_table) -> (out,) or (out,
    workspace) on CUDA."""
    raw = ffi.decode_ffi(platform, softmax_scale, num_splits)
    names = ("dout", "workspace") if platform == "cuda" else ("dout",)
    call = _partitioned(raw, DECODE_ARGS, names)
    if paged:
        return _varying_like(_batched_paged(call))
    return _varying_like(_batched(call, DECODE_ARGS))


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
