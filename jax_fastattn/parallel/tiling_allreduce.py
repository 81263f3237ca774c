"""Tensor-parallel attention block with FastAttention's tiling-AllReduce.

Megatron-style tensor parallelism splits the heads over the `axis` devices:
each device projects x to its own query and K/V heads (columns of wq, wk, wv),
runs attention on them, and multiplies by its rows of wo. The [B, S, d_model]
results are partial sums, reduced by one all-reduce that nothing overlaps.

Tiling-AllReduce (FastAttention, arXiv 2410.16663, Sec. 4.3) cuts the
sequence into chunks: chunk c's queries are projected, attend to the keys
they see, are projected out and all-reduced (one `psum` per chunk) while the
next chunk computes. Only the last chunk's all-reduce stays exposed. Causal
chunks are sized by equal work (tiling_cost.chunk_bounds) so that the exposed
tail is the smallest one. With bottom-right causal alignment, chunk
[start, end) against the key prefix [0, end) is exact.

Whether the psums really overlap the next chunk is up to XLA: on GPU, the
latency-hiding scheduler must run them as async all-reduce start/done pairs
and the all-reduce combiner must not merge them back into one.
`OVERLAP_COMPILER_OPTIONS` holds the settings; this module passes them when
it compiles the block itself (called outside `jit`); a caller that jits a
larger program (a model's prefill) passes `overlap_compiler_options(...)` to
its own `jax.jit(..., compiler_options=...)`, because jax refuses options on
a nested jit.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from .. import masks
from ..attention import flash_attention
from . import tiling_cost

_PARAM_NAMES = ("wq", "wk", "wv", "wo")

# XLA debug options (names as in xla/debug_options_flags.cc of jaxlib 0.10 /
# 0.11), passed per compile, never read from the environment.
OVERLAP_COMPILER_OPTIONS = {
    "gpu": {
        # Schedule async collectives so that independent compute runs between
        # all-reduce-start and all-reduce-done.
        "xla_gpu_enable_latency_hiding_scheduler": True,
        # Otherwise the combiner merges the chunks' independent all-reduces
        # into one at the end, which undoes the tiling. A threshold of 0
        # makes the combiner skip; the pass is also named off, in case a
        # version derives its own threshold.
        "xla_gpu_all_reduce_combine_threshold_bytes": 0,
        "xla_disable_hlo_passes": "gpu-all-reduce-combiner,all-reduce-combiner",
    },
    # The CPU compiler runs collectives synchronously, so nothing overlaps;
    # its combiner is off too so that the program has the same structure
    # (one all-reduce per chunk) on both platforms.
    "cpu": {"xla_disable_hlo_passes": "cpu-all-reduce-combiner"},
}


def overlap_compiler_options(platform: Optional[str] = None) -> dict:
    """Compiler options for a jit that contains `tp_attention_block`.

    platform: "gpu" or "cpu" for that platform's options; None (default) for
    their union, which every platform accepts (the options are fields of
    XLA's DebugOptions; each backend ignores the other's), so that a module
    can pass it to `jax.jit` at import time without asking for a backend."""
    if platform is None:
        gpu, cpu = OVERLAP_COMPILER_OPTIONS["gpu"], OVERLAP_COMPILER_OPTIONS["cpu"]
        passes = ",".join(p for opts in (gpu, cpu) for p in opts.get("xla_disable_hlo_passes", "").split(",") if p)
        return {**gpu, **cpu, "xla_disable_hlo_passes": passes}
    platform = "gpu" if platform in ("cuda", "rocm") else platform
    return dict(OVERLAP_COMPILER_OPTIONS.get(platform, {}))


def apply_rope(x, cos, sin):
    """Rotary embedding in the half-split ("rotate_half") convention of
    Hugging Face Llama: x * cos + rotate_half(x) * sin, where rotate_half(x)
    = concat(-x[..., D/2:], x[..., :D/2]). x [B, S, H, D]; cos, sin [B|1, S, D]."""
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    cos = cos.astype(jnp.float32)[:, :, None, :]
    sin = sin.astype(jnp.float32)[:, :, None, :]
    return (x32 * cos + rotated * sin).astype(x.dtype)


def rope_tables(positions, inv_freq):
    """(cos, sin) [B, S, D] for `rope=`, from positions [B, S] and the D/2
    inverse frequencies (jax_fastattn.nn.rope_inv_freq): angles repeated over
    the two halves, as Hugging Face Llama and jax_fastattn.nn.apply_rope."""
    angles = jnp.asarray(positions, jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def _split_mask(mask, causal: bool):
    """(prefix_keys, band_mask, segments) from the user's mask.

    prefix_keys: chunk c attends to keys [0, end_c) (causal-like masks), else
    to all keys. Band masks (Causal, SlidingWindow) stay exact under chunking
    only with bottom-right alignment and prefix keys; Dense masks would need
    slicing per head shard and are not supported."""
    parts = () if mask is None else (mask.parts if isinstance(mask, masks.And) else (mask,))
    bands, segments = [], None
    for part in parts:
        if isinstance(part, (masks.Causal, masks.SlidingWindow)):
            if part.align != "bottom_right":
                raise ValueError("mask: tp_attention_block supports bottom_right-aligned Causal/SlidingWindow "
                                 f"only (chunks attend to key prefixes), got align={part.align!r}")
            bands.append(part)
        elif isinstance(part, masks.Segments):
            if segments is not None:
                raise ValueError("mask: at most one Segments mask is supported by tp_attention_block")
            segments = part
        else:
            raise ValueError("mask: tp_attention_block supports None, Causal, SlidingWindow, Segments and their "
                             f"`&`; got {type(part).__name__}")
    causal_like = causal or any(isinstance(b, masks.Causal) or b.right == 0 for b in bands)
    if bands and not causal_like:
        raise ValueError("mask: a SlidingWindow that sees later keys (right != 0) needs causal=True in "
                         "tp_attention_block (chunks attend to key prefixes)")
    band = None
    for b in bands:
        band = b if band is None else band & b
    return causal_like, band, segments


def _check_args(x, params, mesh, axis, num_heads, num_kv_heads, head_dim):
    if not hasattr(x, "ndim") or x.ndim != 3:
        raise ValueError(f"x must be an array [B, S, d_model], got {getattr(x, 'shape', type(x).__name__)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a float array (float32, bfloat16, float16), got {x.dtype}")
    if not isinstance(params, dict) or any(name not in params for name in _PARAM_NAMES):
        raise ValueError(f"params must be a dict with keys {_PARAM_NAMES}, got "
                         f"{sorted(params) if isinstance(params, dict) else type(params).__name__}")
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis not in mesh.axis_names:
        raise ValueError(f"axis must be one of the mesh axes {mesh.axis_names}, got {axis!r}")
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if not isinstance(num_kv_heads, int) or num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads must be a positive int dividing num_heads ({num_heads}), got "
                         f"{num_kv_heads!r}")
    d_model = x.shape[-1]
    expected = {"wq": (d_model, num_heads * head_dim), "wk": (d_model, num_kv_heads * head_dim),
                "wv": (d_model, num_kv_heads * head_dim), "wo": (num_heads * head_dim, d_model)}
    for name, shape in expected.items():
        if tuple(params[name].shape) != shape:
            raise ValueError(f"params[{name!r}] must have shape {shape} (d_model={d_model}, num_heads={num_heads}, "
                             f"num_kv_heads={num_kv_heads}, head_dim={head_dim}), got {tuple(params[name].shape)}")
    devices = mesh.shape[axis]
    if num_heads % devices or num_kv_heads % devices:
        raise ValueError(f"num_heads ({num_heads}) and num_kv_heads ({num_kv_heads}) must be multiples of the "
                         f"mesh axis {axis!r} size ({devices})")


def tp_attention_block(x, params, *, mesh: Mesh, axis: str = "model", num_chunks=1, causal: bool = True,
                       mask: Optional[masks.Mask] = None, backend: str = "auto", num_heads: int,
                       num_kv_heads: Optional[int] = None, head_dim: Optional[int] = None, rope=None,
                       softmax_scale: Optional[float] = None, return_kv: bool = False):
    """Attention block (QKV projection, attention, output projection) with
    heads sharded over `mesh` axis `axis` and the output all-reduce tiled.

    Args:
      x: [B, S, d_model]. The batch is split over the mesh's other axes
        where it divides their size, else replicated.
      params: {"wq": [d_model, Hq*D], "wk": [d_model, Hkv*D], "wv": [d_model,
        Hkv*D], "wo": [Hq*D, d_model]}, columns (rows of wo) head-major;
        device i of `axis` uses heads [i*H/N, (i+1)*H/N).
      num_chunks: 1 (one all-reduce after the output projection), n (the
        sequence in n chunks, each all-reduced while the next computes), or
        "auto" (tiling_cost.auto_num_chunks on the device's TPCostModel).
      causal, mask: as flash_attention; mask may be None, Causal,
        SlidingWindow (bottom-right), Segments or their `&`.
      backend: flash_attention's backend.
      num_heads, num_kv_heads (default num_heads), head_dim (default
        wq.shape[1] // num_heads).
      rope: None or (cos, sin), each [S, D] or [B, S, D], applied to q and k
        in the half-split convention (`apply_rope`).
      softmax_scale: default 1/sqrt(head_dim).
      return_kv: also return the keys (after RoPE) and values, [B, S, Hkv,
        D] with heads sharded over `axis` (what a prefill writes to its cache).

    Returns [B, S, d_model] in x's dtype, replicated over `axis` (and k, v).
    """
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if head_dim is None and isinstance(params, dict) and "wq" in params and isinstance(num_heads, int) \
            and num_heads > 0:
        head_dim = params["wq"].shape[1] // num_heads
    _check_args(x, params, mesh, axis, num_heads, num_kv_heads, head_dim)
    if not isinstance(return_kv, bool):
        raise ValueError(f"return_kv must be a Python bool, got {type(return_kv).__name__}")
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a Python bool, got {type(causal).__name__}")
    prefix_keys, band, segments = _split_mask(mask, causal)
    batch, seq_len, d_model = x.shape
    devices = mesh.shape[axis]

    if num_chunks == "auto":
        num_chunks = tiling_cost.auto_num_chunks(
            seq_len, causal=prefix_keys, batch=batch, d_model=d_model, q_heads=num_heads, kv_heads=num_kv_heads,
            head_dim=head_dim, num_devices=devices, bytes_per_element=jnp.dtype(x.dtype).itemsize,
            model=tiling_cost.TPCostModel.for_platform(mesh.devices.flat[0].platform))
    if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or not 1 <= num_chunks <= seq_len:
        raise ValueError(f"num_chunks must be 'auto' or an int in [1, S={seq_len}], got {num_chunks!r}")
    bounds = tiling_cost.chunk_bounds(seq_len, num_chunks, prefix_keys, d_model, num_heads // devices, head_dim)

    if rope is not None:
        if not (isinstance(rope, (tuple, list)) and len(rope) == 2):
            raise ValueError("rope must be None or a pair (cos, sin)")
        cos, sin = (r if r.ndim == 3 else r[None] for r in map(jnp.asarray, rope))
        if cos.shape != sin.shape or cos.shape[1:] != (seq_len, head_dim) or cos.shape[0] not in (1, batch):
            raise ValueError(f"rope: cos and sin must have shape [S, D] or [B, S, D] with S={seq_len}, "
                             f"D={head_dim}, got {cos.shape} and {sin.shape}")
        cos = jnp.broadcast_to(cos, (batch, seq_len, head_dim))
        sin = jnp.broadcast_to(sin, (batch, seq_len, head_dim))
        rope = (cos, sin)
    seg_ids = None if segments is None else (jnp.asarray(segments.q_ids), jnp.asarray(segments.kv_ids))
    if seg_ids is not None and any(ids.shape != (batch, seq_len) for ids in seg_ids):
        raise ValueError(f"mask: Segments ids must have shape [B, S] = {(batch, seq_len)} in self-attention")

    other_axes = tuple(a for a in mesh.axis_names if a != axis)
    other_size = 1
    for a in other_axes:
        other_size *= mesh.shape[a]
    batch_axes = other_axes if other_axes and batch % other_size == 0 else None
    plan = _BlockPlan(bounds=bounds, prefix_keys=prefix_keys, causal=causal, band=band, axis=axis,
                      local_q_heads=num_heads // devices, local_kv_heads=num_kv_heads // devices, head_dim=head_dim,
                      backend=backend, softmax_scale=softmax_scale, return_kv=return_kv)
    row_spec = P(batch_axes)
    weights = tuple(params[name] for name in _PARAM_NAMES)
    weight_specs = (P(None, axis), P(None, axis), P(None, axis), P(axis, None))
    block = jax.shard_map(
        functools.partial(_local_block, plan),
        mesh=mesh,
        in_specs=(row_spec, weight_specs, row_spec if rope is not None else None,
                  row_spec if seg_ids is not None else None),
        out_specs=(row_spec, P(batch_axes, None, axis), P(batch_axes, None, axis)) if return_kv else row_spec)
    args = (x, weights, rope, seg_ids)
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(args)):
        # Inside someone's jit/grad/vmap: staged into their program, whose
        # jit must carry overlap_compiler_options() (nested jits cannot).
        return block(*args)
    # Called on concrete arrays: compile here, with the overlap settings.
    options = overlap_compiler_options(mesh.devices.flat[0].platform)
    return jax.jit(block, compiler_options=options or None)(*args)


@dataclasses.dataclass(frozen=True)
class _BlockPlan:
    """Static description of the per-device computation."""

    bounds: tuple             # ((start, end), ...) of the sequence chunks
    prefix_keys: bool         # chunk [start, end) attends to keys [0, end)
    causal: bool
    band: Optional[masks.Mask]
    axis: str
    local_q_heads: int
    local_kv_heads: int
    head_dim: int
    backend: str
    softmax_scale: Optional[float]
    return_kv: bool


def _local_block(plan: _BlockPlan, x, weights, rope, seg_ids):
    """One device's share: its heads, all chunks, one psum per chunk."""
    wq, wk, wv, wo = weights
    batch, seq_len, _ = x.shape
    heads_q, heads_kv, dim = plan.local_q_heads, plan.local_kv_heads, plan.head_dim
    # K/V of the whole sequence first: every chunk needs a prefix of them.
    k = (x @ wk).reshape(batch, seq_len, heads_kv, dim)
    v = (x @ wv).reshape(batch, seq_len, heads_kv, dim)
    if rope is not None:
        k = apply_rope(k, *rope)
    reduced = []
    previous = None
    for index, (start, end) in enumerate(plan.bounds):
        rows = end - start
        x_chunk = x[:, start:end]
        if previous is not None:
            # The schedule, pinned by data dependencies (the barrier makes
            # this chunk's input depend on what it is given): chunk c starts
            # after chunk c-1's output projection, and after chunk c-2's
            # all-reduce has completed; chunk c's all-reduce starts after
            # chunk c-1's has completed (below). So chunk c-1's all-reduce
            # runs while chunk c computes, one all-reduce in flight at a
            # time, and the last (smallest, under causal chunking) is the one
            # left exposed.
            # Without the first dependency XLA's GPU dot merger fuses every
            # chunk's projection (they share wq and wo) into one GEMM after
            # all the attention, and the all-reduces run back to back at the
            # end; without the second the latency-hiding scheduler, which
            # keeps one collective in flight, leaves them all at the end.
            waits_for = (previous,) if index < 2 else (previous, reduced[index - 2])
            _, x_chunk = lax.optimization_barrier((waits_for, x_chunk))
        q = (x_chunk @ wq).reshape(batch, rows, heads_q, dim)
        if rope is not None:
            q = apply_rope(q, rope[0][:, start:end], rope[1][:, start:end])
        kv_end = end if plan.prefix_keys else seq_len
        chunk_mask = plan.band
        if seg_ids is not None:
            segments = masks.Segments(seg_ids[0][:, start:end], seg_ids[1][:, :kv_end])
            chunk_mask = segments if chunk_mask is None else chunk_mask & segments
        # The prefix slices are copied for the custom call: at most n/2 times
        # this device's K/V in extra traffic, small next to the attention.
        attended = flash_attention(q, k[:, :kv_end], v[:, :kv_end], mask=chunk_mask, causal=plan.causal,
                                   softmax_scale=plan.softmax_scale, backend=plan.backend)
        previous = jnp.dot(attended.reshape(batch, rows, heads_q * dim), wo,
                           preferred_element_type=jnp.float32).astype(x.dtype)
        if reduced:
            # One all-reduce in flight: this one starts once the previous has
            # completed (then it runs while the next chunk computes).
            _, previous = lax.optimization_barrier((reduced[-1], previous))
        reduced.append(lax.psum(previous, plan.axis))
    out = reduced[0] if len(reduced) == 1 else jnp.concatenate(reduced, axis=1)
    return (out, k, v) if plan.return_kv else out
