"""Chunked prefill over an OffloadedKV cache: a chunk of Sq new tokens per
row attends over every cached position (device, stream and cpu parts, each
up to the row's length) and causally over its own keys; the partials merge
through their log-sum-exps.

Every cached position precedes the chunk, so the cache parts need only a
length mask (`masks.Segments`), and the chunk's own keys the ordinary causal
mask: no mask ever spans the whole context. Each partial is one
`flash_attention(..., return_lse=True)` call; the stream part is moved block
by block as in decode (`decode.stream_partial`).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

from ..attention import flash_attention
from ..masks import Segments
from ..merge import merge_partials
from .cache import OffloadedKV
from .decode import stream_partial


def _prefix_partial(q, k, v, lengths, scale, backend):
    """(out float32 [B, Sq, Hq, D], lse [B, Hq, Sq]) of every query over k[:, :lengths]."""
    batch, q_len = q.shape[:2]
    kv_ids = jnp.where(jnp.arange(k.shape[1], dtype=jnp.int32)[None, :] < lengths[:, None], 0, -1)
    mask = Segments(jnp.zeros((batch, q_len), jnp.int32), kv_ids.astype(jnp.int32))
    out, lse = flash_attention(q, k, v, mask=mask, softmax_scale=scale, return_lse=True, backend=backend)
    return out.astype(jnp.float32), lse


@functools.partial(jax.jit, static_argnames=("scale", "backend"))
def _accelerator_prefill(q, k_chunk, v_chunk, cache: OffloadedKV, lengths, *, scale: float, backend: str):
    _, stream_len, device_len = cache.part_lengths(lengths)
    out, lse = flash_attention(q, k_chunk, v_chunk, causal=True, softmax_scale=scale, return_lse=True,
                               backend=backend)
    outs, lses = [out.astype(jnp.float32)], [lse]
    if cache.device_k.shape[1] > 0:
        out, lse = _prefix_partial(q, cache.device_k, cache.device_v, device_len, scale, backend)
        outs.append(out)
        lses.append(lse)
    if cache.stream_k is not None:
        batch, q_len, heads = q.shape[:3]
        empty = (jnp.zeros(q.shape, jnp.float32), jnp.full((batch, heads, q_len), -jnp.inf, jnp.float32))
        out, lse = stream_partial(lambda k, v, n: _prefix_partial(q, k, v, n, scale, backend),
                                  cache.stream_k, cache.stream_v, stream_len, empty)
        outs.append(out)
        lses.append(lse)
    return merge_partials(outs, lses)


_cpu_prefix_jit = jax.jit(_prefix_partial, static_argnames=("scale", "backend"))
_merge_jit = jax.jit(merge_partials)


def prefill_attention_offloaded(q, k_chunk, v_chunk, cache: OffloadedKV, lengths, *,
                                softmax_scale: Optional[float] = None, backend: str = "auto",
                                cpu_backend: str = "cpu", return_lse: bool = False):
    """Attention of a chunk q [B, Sq, Hq, D] whose keys k_chunk/v_chunk
    [B, Sq, Hkv, D] follow each row's lengths[b] cached positions: query i
    sees every cached position and chunk keys 0..i. Returns [B, Sq, Hq, D] in
    q's dtype (and lse float32 [B, Hq, Sq]). Afterwards
    `cache.append(k_chunk, v_chunk, lengths)` stores the chunk. As in decode,
    a cache with a cpu part cannot be traced."""
    if not isinstance(cache, OffloadedKV):
        raise ValueError(f"cache must be an OffloadedKV, got {type(cache).__name__}")
    if q.ndim != 4 or k_chunk.ndim != 4 or k_chunk.shape != v_chunk.shape or k_chunk.shape[:2] != q.shape[:2]:
        raise ValueError(f"q must be [B, Sq, Hq, D] and k_chunk, v_chunk [B, Sq, Hkv, D] of the same B and Sq, got "
                         f"{q.shape}, {k_chunk.shape}, {v_chunk.shape}")
    if k_chunk.shape[0] != cache.device_k.shape[0] or k_chunk.shape[2:] != cache.device_k.shape[2:]:
        raise ValueError(f"k_chunk {k_chunk.shape} must match the cache's B, Hkv, D {cache.device_k.shape}")
    lengths = jnp.asarray(lengths, jnp.int32)
    if lengths.shape != (q.shape[0],):
        raise ValueError(f"lengths must have shape [B] = ({q.shape[0]},), got {lengths.shape}")
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if cache.cpu_k is not None:
        if isinstance(q, jax.core.Tracer) or isinstance(lengths, jax.core.Tracer):
            raise ValueError("cache has a cpu part (strategy 'split'), which cannot be traced: call "
                             "prefill_attention_offloaded outside jit, or plan with strategy='stream'")
        cpu_device = next(iter(cache.cpu_k.devices()))
        cpu_len, _, _ = cache.part_lengths(lengths)
        q_cpu, len_cpu = jax.device_put((q, cpu_len), cpu_device)
        cpu_out, cpu_lse = _cpu_prefix_jit(q_cpu, cache.cpu_k, cache.cpu_v, len_cpu, scale=scale,
                                           backend=cpu_backend)                      # dispatched first
    out, lse = _accelerator_prefill(q, k_chunk, v_chunk, cache, lengths, scale=scale, backend=backend)
    if cache.cpu_k is not None:
        cpu_out, cpu_lse = jax.device_put((cpu_out, cpu_lse), next(iter(cache.device_k.devices())))
        out, lse = _merge_jit([out, cpu_out], [lse, cpu_lse])
    out = out.astype(q.dtype)
    return (out, lse) if return_lse else out
