"""Partial decode attention with its log-sum-exp, over one part of a KV cache.

Offloaded attention computes one partial (out, lse) per part of the cache
(device-resident, each streamed host block, the CPU's host part) and merges
them with `jax_fastattn.merge_partials`. The partials come from one of three
paths:

- "decode:cpu", "decode:cuda": a decode kernel
  (`decode_attention(..., return_lse=True)` with that backend): split-KV
  over the part in its stored layout, the GQA group sharing each loaded K/V
  row, bf16 read natively; slots past the length are never read. "decode"
  picks the kernel of the platform k lives on (under a trace, where arrays
  have no device, the default backend's; name the kernel for a jit placed
  on another device).
- "einsum": plain JAX (logits by einsum, masked softmax, P·V in the cache's
  dtype with float32 accumulation), as two matrix products over the cache in
  its stored layout (partial_decode_einsum); bandwidth-bound like the decode
  kernels, and runnable on any device. It needs finite values in cache slots past the length (a 0-weight
  NaN in V would still poison P·V); the offload cache keeps them zero.
- a flash_attention backend ("auto", "cpu", "cuda", "xla", ...): the GQA
  group is folded into the query axis (q [B, Hq, D] -> [B, g, Hkv, D], so
  the kernel sees MHA with Sq = g) and the keys are folded into the batch
  axis (n chunks of the part -> batch B*n), which gives the kernel
  B*n*Hkv work items instead of B*Hkv (split-KV, as flash-decoding); the n
  chunk results merge through their LSEs. Keys past the length are masked
  with `masks.Segments`, so those slots may hold anything.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from ..attention import flash_attention
from ..decode import decode_attention
from ..masks import Segments
from ..merge import merge_partials

# Work items the folded flash_attention call aims for: several per core of a
# 16-core host; on a GPU, about 8 CTAs per SM of a 132-SM H100/H200, as the
# CUDA decode kernel aims for, so that enough loads are in flight to stream
# the part at full bandwidth.
_TARGET_ITEMS = {"cpu": 256, "gpu": 1024}
_MIN_CHUNK_KEYS = 256


def check_partial_inputs(q, k, v, lengths):
    if q.ndim != 3:
        raise ValueError(f"q must have rank 3 [B, Hq, D] (one new token per row), got shape {q.shape}")
    for name, x in (("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must have rank 4 [B, S, Hkv, D], got shape {x.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}")
    batch, heads, dim = q.shape
    if k.shape[0] != batch or k.shape[3] != dim or heads % k.shape[2] != 0:
        raise ValueError(f"k [B, S, Hkv, D] = {k.shape} must match q [B, Hq, D] = {q.shape} with Hq % Hkv == 0")
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape [B] = ({batch},), got {lengths.shape}")


def partial_decode_einsum(q, k, v, lengths, softmax_scale: float):
    """(out [B, Hq, D] in q's dtype, lse float32 [B, Hq]) over k[:, :lengths].

    Written as two plain matrix products over the cache in its own layout
    [B, S, Hkv*D], so that no transposed copy of K or V is made (a dot with
    the kv head as a batch dimension would need it major): q becomes a
    block-diagonal [Hkv*D, Hkv*g] matrix (kv head h's block holds its g query
    heads), logits = K @ q_bd; P·V gives [Hkv*g, Hkv*D], whose diagonal
    blocks are the outputs. Hkv times the FLOPs of the grouped form, still
    far below the bytes' time on a bandwidth-bound decode."""
    batch, heads, dim = q.shape
    seq, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    eye = jnp.eye(kv_heads, dtype=k.dtype)
    q_grouped = q.reshape(batch, kv_heads, group, dim).astype(k.dtype)
    q_block_diagonal = jnp.einsum("bhgd,hk->bhdkg", q_grouped, eye).reshape(batch, kv_heads * dim, heads)
    keys = k.reshape(batch, seq, kv_heads * dim)
    logits = jnp.einsum("bsc,bcn->bsn", keys, q_block_diagonal, preferred_element_type=jnp.float32)
    logits = logits * softmax_scale                                       # [B, S, Hq]
    visible = (jnp.arange(seq, dtype=jnp.int32)[None, :] < lengths[:, None])[:, :, None]
    logits = jnp.where(visible, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=1, keepdims=True)
    safe_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    probs = jnp.exp(logits - safe_max)                                    # 0 where masked
    row_sum = jnp.sum(probs, axis=1)                                      # [B, Hq]
    seen = row_sum > 0
    # Positions past the length may hold garbage: zeroed (0 x NaN is NaN).
    values = jnp.where(visible, v.reshape(batch, seq, kv_heads * dim), jnp.zeros((), v.dtype))
    products = jnp.einsum("bsn,bsc->bnc", probs.astype(v.dtype), values, preferred_element_type=jnp.float32)
    products = products.reshape(batch, kv_heads, group, kv_heads, dim)
    out = jnp.einsum("bhghd->bhgd", products).reshape(batch, heads, dim)   # the diagonal blocks
    out = out / jnp.where(seen, row_sum, 1.0)[..., None]
    lse = jnp.where(seen, safe_max[:, 0] + jnp.log(jnp.where(seen, row_sum, 1.0)), -jnp.inf)
    return out.astype(q.dtype), lse


def default_kv_chunks(batch: int, kv_heads: int, seq: int, platform: str = "cpu") -> int:
    """Chunks n of the key axis folded into the batch: a divisor of seq (a free
    reshape) giving about _TARGET_ITEMS work items of >= _MIN_CHUNK_KEYS keys.
    (The planner makes parts whole multiples of 1024 positions.)"""
    target = _TARGET_ITEMS["cpu" if platform == "cpu" else "gpu"]
    wanted = max(1, min(target // max(1, batch * kv_heads), seq // _MIN_CHUNK_KEYS))
    for n in range(wanted, 0, -1):
        if seq % n == 0:
            return n
    return 1


def _platform(x) -> str:
    """The platform x lives on; under a trace, the default backend's."""
    try:
        return next(iter(x.devices())).platform
    except (AttributeError, jax.errors.ConcretizationTypeError, StopIteration):
        return jax.default_backend()


def partial_decode_folded(q, k, v, lengths, softmax_scale: float, backend: str, kv_chunks: Optional[int] = None):
    """Same result as partial_decode_einsum through one flash_attention call."""
    batch, heads, dim = q.shape
    seq, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    chunks = kv_chunks or default_kv_chunks(batch, kv_heads, seq, "cpu" if backend == "cpu" else _platform(k))
    if seq % chunks:
        raise ValueError(f"kv_chunks must divide the part's length {seq}, got {chunks}")
    chunk = seq // chunks
    # [B, Hq, D] -> [B, g, Hkv, D]: q head kvh*g + j becomes query j of head kvh.
    q_folded = q.reshape(batch, kv_heads, group, dim).transpose(0, 2, 1, 3)
    q_folded = jnp.repeat(q_folded, chunks, axis=0)                       # [B*n, g, Hkv, D]
    k_folded = k.reshape(batch * chunks, chunk, kv_heads, dim)
    v_folded = v.reshape(batch * chunks, chunk, kv_heads, dim)
    starts = jnp.arange(chunks, dtype=jnp.int32) * chunk
    chunk_lengths = jnp.clip(lengths[:, None] - starts[None, :], 0, chunk).reshape(-1)   # [B*n]
    kv_ids = jnp.where(jnp.arange(chunk, dtype=jnp.int32)[None, :] < chunk_lengths[:, None], 0, -1)
    q_ids = jnp.zeros((batch * chunks, group), jnp.int32)
    out, lse = flash_attention(q_folded, k_folded, v_folded, mask=Segments(q_ids, kv_ids.astype(jnp.int32)),
                               softmax_scale=softmax_scale, return_lse=True, backend=backend)
    # out [B*n, g, Hkv, D] -> [B, n, Hq, D]; lse [B*n, Hkv, g] -> [B, n, Hq].
    out = out.reshape(batch, chunks, group, kv_heads, dim).transpose(0, 1, 3, 2, 4).reshape(batch, chunks, heads, dim)
    lse = lse.reshape(batch, chunks, heads)
    if chunks == 1:
        return out[:, 0], lse[:, 0]
    return merge_partials([out[:, i] for i in range(chunks)], [lse[:, i] for i in range(chunks)])


DECODE_KERNELS = ("decode", "decode:cpu", "decode:cuda")


def partial_decode_kernel(q, k, v, lengths, softmax_scale: float, backend: str = "decode"):
    """Same result through a decode kernel (backend one of DECODE_KERNELS)."""
    kernel = backend.partition(":")[2] or ("cpu" if _platform(k) == "cpu" else "cuda")
    return decode_attention(q, k, v, lengths, softmax_scale=softmax_scale, backend=kernel, return_lse=True)


def partial_decode(q, k, v, lengths, *, softmax_scale: Optional[float] = None, backend: str = "einsum",
                   kv_chunks: Optional[int] = None):
    """Decode attention of q [B, Hq, D] over k/v [B, S, Hkv, D][:, :lengths],
    with its log-sum-exp: (out [B, Hq, D], lse float32 [B, Hq]); a row with
    length 0 gives zeros and lse = -inf. backend: "einsum" (plain JAX),
    "decode", "decode:cpu", "decode:cuda" (a decode kernel) or a
    flash_attention backend (module docstring); kv_chunks applies to the
    last only."""
    lengths = jnp.asarray(lengths, jnp.int32)
    check_partial_inputs(q, k, v, lengths)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if k.shape[1] == 0:
        return jnp.zeros(q.shape, q.dtype), jnp.full(q.shape[:2], -jnp.inf, jnp.float32)
    if backend == "einsum":
        return partial_decode_einsum(q, k, v, lengths, scale)
    if backend in DECODE_KERNELS:
        return partial_decode_kernel(q, k, v, lengths, scale, backend)
    return partial_decode_folded(q, k, v, lengths, scale, backend, kv_chunks)


partial_decode_jit = jax.jit(partial_decode, static_argnames=("softmax_scale", "backend", "kv_chunks"))
