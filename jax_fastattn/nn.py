"""Flax NNX attention layers on jax_fastattn's kernels.

`Attention` is a grouped-query attention layer (MHA, GQA, MQA) with rotary
position embeddings (Llama-3 frequency scaling included), causal /
sliding-window / segment masks and an additive bias. Prefill runs through
`flash_attention`; single-token decode runs through `decode_attention` against
a `KVCache` (contiguous [B, Smax, Hkv, D] or paged). `implementation=` switches
the attention itself between our kernels ("fastattn") and
`jax.nn.dot_product_attention` ("cudnn", "xla") with the same parameters, for
comparison.

Parameter layout is `nnx.MultiHeadAttention`'s (and MaxText's): `query`,
`key`, `value` are `nnx.LinearGeneral` kernels [d_model, heads, head_dim], `out`
is [heads, head_dim, d_model]; a [d_model, heads * head_dim] 2-D view is a free
reshape.

RoPE uses the "rotate_half" convention (GPT-NeoX, Hugging Face Llama): the
rotated pairs are (x[i], x[i + D/2]), not adjacent elements. Hugging Face Llama
checkpoints are stored for this convention; Meta's original checkpoints pair
adjacent elements and need HF's q/k permutation first.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from . import masks
from .attention import flash_attention
from .decode import decode_attention

IMPLEMENTATIONS = ("fastattn", "cudnn", "xla")


def check_implementation(implementation: str) -> None:
    """Raise ValueError for an unknown name or "cudnn" off a GPU."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError(f"implementation='cudnn' needs an NVIDIA GPU (cuDNN); the default backend here is "
                         f"{jax.default_backend()!r}: use 'fastattn' or 'xla'")


# ----------------------------------------------------------------------------
# Rotary position embeddings


def rope_inv_freq(head_dim: int, theta: float = 10000.0, scaling: Optional[dict] = None) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] (float32), with Llama-3 scaling.

    scaling: None or a Hugging Face `rope_scaling` dict with rope_type
    "llama3" (factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings). Formula as Hugging Face
    `_compute_llama3_parameters` / Meta's llama-models `apply_scaling`: long
    wavelengths are divided by `factor`, short ones kept, the band between
    interpolated smoothly.
    """
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling is None:
        return inv_freq.astype(np.float32)
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return inv_freq.astype(np.float32)
    if kind != "llama3":
        raise ValueError(f"rope_scaling rope_type must be 'llama3' or 'default', got {kind!r}")
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x, positions, inv_freq):
    """x [B, S, H, D] rotated by positions [B, S] (rotate_half pairs), in f32."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, S, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    xf = x.astype(jnp.float32)
    return (xf * jnp.cos(angles) + rotate_half(xf) * jnp.sin(angles)).astype(x.dtype)


# ----------------------------------------------------------------------------
# The attention itself: our kernels or jax.nn.dot_product_attention


def _jax_attention(q, k, v, bias, mask, implementation, softmax_scale, **kwargs):
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=softmax_scale,
                                        implementation=implementation, **kwargs)


def _dense_mask(batch, q_len, kv_len, causal, window, q_ids, kv_ids):
    """bool [B|1, 1, Sq, Skv], bottom-right aligned like jax_fastattn.masks."""
    row = jnp.arange(q_len)[:, None] + (kv_len - q_len)
    col = jnp.arange(kv_len)[None, :]
    keep = jnp.ones((q_len, kv_len), bool)
    if causal:
        keep &= col <= row
    if window is not None:
        keep &= col > row - window
    keep = keep[None, None]
    if q_ids is not None:
        same = (q_ids[:, :, None] == kv_ids[:, None, :]) & (q_ids[:, :, None] >= 0) & (kv_ids[:, None, :] >= 0)
        keep = keep & same[:, None]
    return jnp.broadcast_to(keep, (keep.shape[0] if q_ids is not None else 1, 1, q_len, kv_len))


def dot_product_attention(q, k, v, *, implementation: str = "fastattn", causal: bool = False,
                          sliding_window: Optional[int] = None, segment_ids=None, kv_segment_ids=None, bias=None,
                          softmax_scale: Optional[float] = None, backend: str = "auto"):
    """Attention over q [B, Sq, Hq, D], k/v [B, Skv, Hkv, D] by implementation.

    causal and sliding_window (W: a query sees itself and the W - 1 keys
    before it) are bottom-right aligned; segment_ids [B, Sq] and
    kv_segment_ids [B, Skv] (default segment_ids) restrict attention to equal
    ids, negative ids are padding. "fastattn" calls `flash_attention` with
    `backend`; "cudnn" / "xla" call `jax.nn.dot_product_attention`.
    """
    check_implementation(implementation)
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        raise ValueError(f"sliding_window must be None or an int >= 1, got {sliding_window!r}")
    if segment_ids is not None and kv_segment_ids is None:
        kv_segment_ids = segment_ids
    if implementation == "fastattn":
        parts = []
        if sliding_window is not None:
            parts.append(masks.SlidingWindow(sliding_window - 1, 0 if causal else None))
        elif causal:
            parts.append(masks.Causal())
        if segment_ids is not None:
            parts.append(masks.Segments(jnp.asarray(segment_ids, jnp.int32), jnp.asarray(kv_segment_ids, jnp.int32)))
        mask = None
        for part in parts:
            mask = part if mask is None else mask & part
        return flash_attention(q, k, v, mask=mask, bias=bias, softmax_scale=softmax_scale, backend=backend)
    q_len, kv_len = q.shape[1], k.shape[1]
    if segment_ids is None and q_len == kv_len and (sliding_window is None or causal):
        # The fused paths of jax (cuDNN) take causal / windows as flags, not masks.
        window = None if sliding_window is None else (sliding_window - 1, 0)
        return _jax_attention(q, k, v, bias, None, implementation, softmax_scale, is_causal=causal,
                              local_window_size=window)
    if sliding_window is not None and not causal:
        raise ValueError("sliding_window without causal is only supported by implementation='fastattn' "
                         "when Sq != Skv or with segment_ids")
    mask = _dense_mask(q.shape[0], q_len, kv_len, causal, sliding_window,
                       None if segment_ids is None else jnp.asarray(segment_ids),
                       None if kv_segment_ids is None else jnp.asarray(kv_segment_ids))
    out = _jax_attention(q, k, v, bias, mask, implementation, softmax_scale)
    # jax averages over all keys in a row that sees none; ours return zeros.
    sees_some = jnp.any(mask, axis=-1)[:, 0, :, None, None]  # [B|1, Sq, 1, 1]
    return jnp.where(sees_some, out, jnp.zeros_like(out))


def attend_cache(q, k_cache, v_cache, lengths, *, page_table=None, implementation: str = "fastattn",
                 sliding_window: Optional[int] = None, softmax_scale: Optional[float] = None,
                 backend: str = "auto"):
    """One new query per row, q [B, Hq, D], over the first lengths[b] cached keys.

    Caches as `decode_attention` (contiguous [B, Smax, Hkv, D], or paged
    pages [N, page, Hkv, D] with page_table [B, max_pages]). "fastattn" runs
    `decode_attention` (split-KV kernels); "cudnn" / "xla" run
    `jax.nn.dot_product_attention` with key_value_seq_lengths. With a
    sliding_window only the last W valid keys are visible.
    """
    check_implementation(implementation)
    lengths = jnp.asarray(lengths, jnp.int32)
    if implementation == "fastattn" and sliding_window is None:
        return decode_attention(q, k_cache, v_cache, lengths, page_table=page_table,
                                softmax_scale=softmax_scale, backend=backend)
    if page_table is not None:
        gather = lambda c: c[page_table].reshape(page_table.shape[0], -1, *c.shape[2:])
        k_cache, v_cache = gather(k_cache), gather(v_cache)
    if sliding_window is None:
        out = _jax_attention(q[:, None], k_cache, v_cache, None, None, implementation, softmax_scale,
                             key_value_seq_lengths=lengths)
        # A row that sees no key gives zeros, as decode_attention does (jax
        # would average every key).
        return jnp.where((lengths > 0)[:, None, None], out[:, 0], jnp.zeros((), out.dtype))
    pos = jnp.arange(k_cache.shape[1], dtype=jnp.int32)[None, :]
    visible = (pos < lengths[:, None]) & (pos >= lengths[:, None] - sliding_window)
    kv_ids = jnp.where(visible, 0, -1).astype(jnp.int32)
    q_ids = jnp.zeros((q.shape[0], 1), jnp.int32)
    out = dot_product_attention(q[:, None], k_cache, v_cache, implementation=implementation, segment_ids=q_ids,
                                kv_segment_ids=kv_ids, softmax_scale=softmax_scale, backend=backend)
    return out[:, 0]


def fastattn_attention_fn(backend: str = "auto") -> Callable:
    """A drop-in `attention_fn` for `nnx.MultiHeadAttention` on flash_attention.

    Takes Flax's arguments (query, key, value, bias=None, mask=None, ...):
    mask is bool [B|1, H|1, Sq, Skv] (True = attend), bias additive. Dropout
    is not supported (dropout_rate must be 0 or deterministic=True).
    """

    def attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True, dropout_rng=None,
                     dropout_rate=0.0, deterministic=False, dtype=None, precision=None, module=None,
                     promote_dtype=None, is_causal=False):
        if dropout_rate > 0.0 and not deterministic:
            raise ValueError(f"dropout_rate must be 0 (or deterministic=True) with fastattn, got {dropout_rate}")
        if dtype is not None:
            query, key, value = (x.astype(dtype) for x in (query, key, value))
        dense = None if mask is None else masks.Dense(jnp.asarray(mask, bool))
        return flash_attention(query, key, value, mask=dense, causal=bool(is_causal), bias=bias, backend=backend)

    return attention_fn


# ----------------------------------------------------------------------------
# KV cache and the layer


@struct.dataclass
class KVCache:
    """Keys and values of one attention layer, and the valid length per row.

    Contiguous: k, v [B, Smax, Hkv, D], page_table None. Paged: k, v
    [num_pages, page_size, Hkv, D] and page_table int32 [B, max_pages]
    (position p of row b lives in page page_table[b, p // page_size]).
    lengths int32 [B]: positions [0, lengths[b]) are valid.
    """
    k: jax.Array
    v: jax.Array
    lengths: jax.Array
    page_table: Optional[jax.Array] = None

    @classmethod
    def init(cls, batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype=jnp.float32):
        shape = (batch, max_len, num_kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))

    @classmethod
    def init_paged(cls, page_table, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                   dtype=jnp.float32):
        page_table = jnp.asarray(page_table, jnp.int32)
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                   jnp.zeros((page_table.shape[0],), jnp.int32), page_table)

    def write(self, k_new, v_new, start):
        """Store k_new/v_new [B, S, Hkv, D] at positions start[b] + [0, S)."""
        batch, steps = k_new.shape[:2]
        pos = jnp.asarray(start, jnp.int32)[:, None] + jnp.arange(steps, dtype=jnp.int32)[None, :]
        if self.page_table is None:
            rows = jnp.broadcast_to(jnp.arange(batch)[:, None], pos.shape)
            index = (rows, pos)
        else:
            page_size = self.k.shape[1]
            pages = jnp.take_along_axis(self.page_table, pos // page_size, axis=1)
            index = (pages, pos % page_size)
        k = self.k.at[index].set(k_new.astype(self.k.dtype), mode="drop")
        v = self.v.at[index].set(v_new.astype(self.v.dtype), mode="drop")
        return self.replace(k=k, v=v)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE, masks, bias and a KV cache.

    Args:
      in_features: model width d_model (also the output width).
      num_heads: query heads Hq; num_kv_heads: key/value heads Hkv (divides
        Hq; default Hq). head_dim default d_model // Hq.
      rope_theta / rope_scaling: RoPE base and Hugging Face `rope_scaling`
        (None or Llama-3); use_rope=False disables RoPE.
      sliding_window: None or W (each query sees W keys including itself).
      implementation: "fastattn" (flash_attention / decode_attention),
        "cudnn" or "xla" (jax.nn.dot_product_attention).
      backend: passed to flash_attention / decode_attention.
      dtype: computation dtype (default: the input's); param_dtype: storage.
    """

    def __init__(self, in_features: int, num_heads: int, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, *, rope_theta: float = 10000.0, rope_scaling: Optional[dict] = None,
                 use_rope: bool = True, sliding_window: Optional[int] = None, implementation: str = "fastattn",
                 backend: str = "auto", softmax_scale: Optional[float] = None, dtype=None,
                 param_dtype=jnp.float32, kernel_init=nnx.initializers.lecun_normal(), rngs: nnx.Rngs):
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})")
        head_dim = in_features // num_heads if head_dim is None else head_dim
        if head_dim < 1:
            raise ValueError(f"head_dim must be >= 1, got {head_dim}")
        check_implementation(implementation)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.implementation, self.backend = implementation, backend
        self.sliding_window, self.softmax_scale, self.dtype = sliding_window, softmax_scale, dtype
        # A tuple: a static constant of the module, not state.
        self.inv_freq = tuple(rope_inv_freq(head_dim, rope_theta, rope_scaling).tolist()) if use_rope else None
        proj = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)
        self.query = nnx.LinearGeneral(in_features, (num_heads, head_dim), **proj)
        self.key = nnx.LinearGeneral(in_features, (num_kv_heads, head_dim), **proj)
        self.value = nnx.LinearGeneral(in_features, (num_kv_heads, head_dim), **proj)
        self.out = nnx.LinearGeneral((num_heads, head_dim), in_features, axis=(-2, -1), **proj)

    def project(self, x, positions):
        """x [B, S, d_model], positions [B, S] -> q [B,S,Hq,D], k, v [B,S,Hkv,D]."""
        q, k, v = self.query(x), self.key(x), self.value(x)
        if self.inv_freq is not None:
            q, k = apply_rope(q, positions, self.inv_freq), apply_rope(k, positions, self.inv_freq)
        return q, k, v

    def attend(self, q, k, v, *, causal=True, segment_ids=None, bias=None):
        return dot_product_attention(q, k, v, implementation=self.implementation, causal=causal,
                                     sliding_window=self.sliding_window, segment_ids=segment_ids, bias=bias,
                                     softmax_scale=self.softmax_scale, backend=self.backend)

    def attend_cache(self, q, cache: KVCache):
        """q [B, Hq, D] over the cache's valid prefix (new key included)."""
        return attend_cache(q, cache.k, cache.v, cache.lengths, page_table=cache.page_table,
                            implementation=self.implementation, sliding_window=self.sliding_window,
                            softmax_scale=self.softmax_scale, backend=self.backend)

    @staticmethod
    def _positions(x, positions):
        if positions is None:
            return jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
        return jnp.asarray(positions, jnp.int32)

    def __call__(self, x, *, positions=None, causal: bool = True, segment_ids=None, bias=None):
        """Self-attention over x [B, S, d_model] -> [B, S, d_model] (no cache)."""
        q, k, v = self.project(x, self._positions(x, positions))
        return self.out(self.attend(q, k, v, causal=causal, segment_ids=segment_ids, bias=bias))

    def prefill(self, x, cache: KVCache, lengths, *, positions=None):
        """Causal self-attention over a right-padded prompt x [B, S, d_model];
        stores its keys/values at [0, S) and sets the cache lengths."""
        capacity = cache.k.shape[1] * (1 if cache.page_table is None else cache.page_table.shape[1])
        if x.shape[1] > capacity:
            raise ValueError(f"x has {x.shape[1]} positions, more than the cache holds ({capacity})")
        q, k, v = self.project(x, self._positions(x, positions))
        cache = cache.write(k, v, jnp.zeros((x.shape[0],), jnp.int32))
        cache = cache.replace(lengths=jnp.asarray(lengths, jnp.int32))
        return self.out(self.attend(q, k, v, causal=True)), cache

    def decode(self, x, cache: KVCache):
        """One token per row, x [B, d_model], at position cache.lengths[b]:
        stores its key/value, attends over the prefix, returns (y, cache)."""
        positions = cache.lengths[:, None]
        q, k, v = self.project(x[:, None], positions)
        cache = cache.write(k, v, cache.lengths)
        cache = cache.replace(lengths=cache.lengths + 1)
        return self.out(self.attend_cache(q[:, 0], cache)), cache
