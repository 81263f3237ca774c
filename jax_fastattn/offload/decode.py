"""Decode attention over an OffloadedKV cache: device part, streamed host
blocks (strategy "stream") and the CPU's host part (strategy "split"),
merged exactly through their log-sum-exps.

Stream: one jit takes the host-memory blocks as arguments; a scan over the
blocks copies block i+1 to device memory (`jax.device_put(...,
jax.memory.Space.Device)`, which XLA lowers to an asynchronous host-to-device
copy) while it attends over block i, carried from the previous step: double
buffering, with the copy engine and the compute units busy at once. The
device part has no dependence on the blocks, so XLA may also overlap it with
the first copy. Partials merge online with `merge_partials`.

Split: the CPU part is attended on the CPU device (by default the C++
decode kernel, `decode_attention(backend="cpu", return_lse=True)`) in a
computation dispatched before the
accelerator's, so both run at once (JAX dispatch is asynchronous); the
CPU's (out, lse) (B * Hq * (D + 1) numbers) then moves to the accelerator
and merges there.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

from ..merge import merge_partials
from .cache import OffloadedKV
from .partial import check_partial_inputs, partial_decode


def _block_lengths(stream_lengths, i, block):
    return jnp.clip(stream_lengths - i * block, 0, block)


def stream_partial(attend, stream_k, stream_v, stream_lengths, empty):
    """Merged partial over the stream part, blocks moved host -> device.

    attend(k_block, v_block, block_lengths) -> (out float32, lse) on one
    device-resident block [B, blk, Hkv, D]; empty: the (out, lse) of no keys,
    the accumulator's start. Stacked blocks [nb, B, blk, Hkv, D]: a
    double-buffered scan (block i+1's copy in flight while block i is
    attended). Separate blocks (a tuple): each moved whole, the loop unrolled
    with block i+1's copy issued before block i's attention, overlapped by
    XLA's scheduling of the asynchronous copies; no slicing of host memory."""
    to_device = lambda x: jax.device_put(x, jax.memory.Space.Device)  # noqa: E731
    if isinstance(stream_k, tuple):
        block = stream_k[0].shape[1]
        outs, lses = [empty[0]], [empty[1]]
        current = (to_device(stream_k[0]), to_device(stream_v[0]))
        for i in range(len(stream_k)):
            following = (to_device(stream_k[i + 1]), to_device(stream_v[i + 1])) if i + 1 < len(stream_k) else None
            out, lse = attend(*current, _block_lengths(stream_lengths, i, block))
            outs.append(out)
            lses.append(lse)
            current = following
        return merge_partials(outs, lses)

    num_blocks, block = stream_k.shape[0], stream_k.shape[2]

    def fetch(i):
        take = lambda x: jax.lax.dynamic_index_in_dim(x, i, axis=0, keepdims=False)  # noqa: E731
        return to_device(take(stream_k)), to_device(take(stream_v))

    def step(carry, i):
        (k_block, v_block), acc_out, acc_lse = carry
        next_block = fetch(i + 1)                      # in flight while block i is attended
        out, lse = attend(k_block, v_block, _block_lengths(stream_lengths, i, block))
        acc_out, acc_lse = merge_partials([acc_out, out], [acc_lse, lse])
        return (next_block, acc_out, acc_lse), None

    carry = (fetch(0),) + tuple(empty)
    if num_blocks > 1:
        carry, _ = jax.lax.scan(step, carry, jnp.arange(num_blocks - 1))
    (k_block, v_block), acc_out, acc_lse = carry
    out, lse = attend(k_block, v_block, _block_lengths(stream_lengths, num_blocks - 1, block))
    return merge_partials([acc_out, out], [acc_lse, lse])


@functools.partial(jax.jit, static_argnames=("scale", "backend"))
def accelerator_partial(q, cache: OffloadedKV, lengths, *, scale: float, backend: str = "einsum"):
    """(out float32 [B, Hq, D], lse [B, Hq]) over the device and stream parts.
    Jittable and composable: a whole decode step of a model may call it per
    layer inside one jit (the cpu part, if any, is ignored here)."""
    _, stream_len, device_len = cache.part_lengths(lengths)
    outs, lses = [], []
    if cache.device_k.shape[1] > 0:
        out, lse = partial_decode(q, cache.device_k, cache.device_v, device_len, softmax_scale=scale,
                                  backend=backend)
        outs.append(out.astype(jnp.float32))
        lses.append(lse)
    if cache.stream_k is not None:
        def attend(k_block, v_block, block_lengths):
            out, lse = partial_decode(q, k_block, v_block, block_lengths, softmax_scale=scale, backend=backend)
            return out.astype(jnp.float32), lse

        empty = (jnp.zeros(q.shape, jnp.float32), jnp.full(q.shape[:2], -jnp.inf, jnp.float32))
        out, lse = stream_partial(attend, cache.stream_k, cache.stream_v, stream_len, empty)
        outs.append(out)
        lses.append(lse)
    if not outs:
        return jnp.zeros(q.shape, jnp.float32), jnp.full(q.shape[:2], -jnp.inf, jnp.float32)
    return merge_partials(outs, lses)


@functools.partial(jax.jit, static_argnames=("scale", "backend"))
def _cpu_partial_jit(q, cpu_k, cpu_v, cpu_lengths, *, scale, backend):
    out, lse = partial_decode(q, cpu_k, cpu_v, cpu_lengths, softmax_scale=scale, backend=backend)
    return out.astype(jnp.float32), lse


def cpu_partial(q, cache: OffloadedKV, lengths, *, scale: float, backend: str = "decode:cpu"):
    """Dispatches the cpu part's attention on its device; returns (out, lse)
    there, not yet waited for."""
    cpu_device = next(iter(cache.cpu_k.devices()))
    cpu_len, _, _ = cache.part_lengths(lengths)
    q_cpu, len_cpu = jax.device_put((q, cpu_len), cpu_device)
    return _cpu_partial_jit(q_cpu, cache.cpu_k, cache.cpu_v, len_cpu, scale=scale, backend=backend)


_merge_jit = jax.jit(merge_partials)


def decode_attention_offloaded(q, cache: OffloadedKV, lengths, *, softmax_scale: Optional[float] = None,
                               backend: str = "einsum", cpu_backend: str = "decode:cpu", return_lse: bool = False):
    """Attention of q [B, Hq, D] (one token per row) over the first lengths[b]
    positions of an OffloadedKV cache. Equals `decode_attention` over the same
    cache held in one array. backend: how the accelerator attends ("einsum",
    plain JAX; "decode", its decode kernel; or a flash_attention backend, see
    offload.partial); cpu_backend: the same for the cpu part (default
    "decode:cpu", the C++ decode kernel).

    With a cpu part the call cannot be traced (it runs on two devices);
    without one it can run under jit. Returns out [B, Hq, D] in q's dtype
    (and lse float32 [B, Hq] when return_lse)."""
    if not isinstance(cache, OffloadedKV):
        raise ValueError(f"cache must be an OffloadedKV, got {type(cache).__name__}")
    lengths = jnp.asarray(lengths, jnp.int32)
    check_partial_inputs(q, cache.device_k, cache.device_v, lengths)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if cache.cpu_k is None:
        out, lse = accelerator_partial(q, cache, lengths, scale=scale, backend=backend)
    else:
        if isinstance(q, jax.core.Tracer) or isinstance(lengths, jax.core.Tracer):
            raise ValueError("cache has a cpu part (strategy 'split'), which runs on the CPU device beside the "
                             "accelerator's computation and cannot be traced: call decode_attention_offloaded "
                             "outside jit, or plan with strategy='stream'")
        cpu_out, cpu_lse = cpu_partial(q, cache, lengths, scale=scale, backend=cpu_backend)   # dispatched first
        acc_out, acc_lse = accelerator_partial(q, cache, lengths, scale=scale, backend=backend)
        target = next(iter(cache.device_k.devices()))
        cpu_out, cpu_lse = jax.device_put((cpu_out, cpu_lse), target)
        out, lse = _merge_jit([acc_out, cpu_out], [acc_lse, cpu_lse])
    out = out.astype(q.dtype)
    return (out, lse) if return_lse else out
