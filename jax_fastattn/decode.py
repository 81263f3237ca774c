"""decode_attention(): one new query token per sequence against a KV cache."""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np

from . import masks
from .attention import check_inputs, flash_attention


def decode_attention(q, k_cache, v_cache, lengths, *, softmax_scale: Optional[float] = None,
                     backend: str = "auto"):
    """Attention of q [B, Hq, D] over the first lengths[b] rows of
    k_cache/v_cache [B, Smax, Hkv, D]. Returns [B, Hq, D] in q's dtype.

    A row with length 0 returns zeros; cache rows at or past the length never
    reach the result (they may hold garbage, NaN included). Equals
    `flash_attention` with Sq = 1 over the valid prefix.

    The valid prefix is expressed as a segment mask (cache rows past the
    length are padding), so kernels skip whole tiles past the length and zero
    the padding rows they touch.
    """
    if not hasattr(q, "ndim") or q.ndim != 3:
        raise ValueError(f"q must have rank 3 [B, Hq, D] (one new token per row), got shape {np.shape(q)}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not hasattr(cache, "ndim") or cache.ndim != 4:
            raise ValueError(f"{name} must have rank 4 [B, Smax, Hkv, D], got shape {np.shape(cache)}")
    batch, s_max = k_cache.shape[0], k_cache.shape[1]
    if np.shape(lengths) != (batch,):
        raise ValueError(f"lengths must have shape [B] = ({batch},), got {np.shape(lengths)}")
    if not jnp.issubdtype(jnp.result_type(lengths), jnp.integer):
        raise TypeError(f"lengths must be an integer array, got dtype {jnp.result_type(lengths)}")
    q4 = q[:, None]
    check_inputs(q4, k_cache, v_cache, None, softmax_scale)
    valid = jnp.arange(s_max, dtype=jnp.int32)[None, :] < jnp.asarray(lengths, jnp.int32)[:, None]
    kv_ids = jnp.where(valid, 0, -1).astype(jnp.int32)
    q_ids = jnp.zeros((batch, 1), jnp.int32)
    out = flash_attention(q4, k_cache, v_cache, mask=masks.Segments(q_ids, kv_ids),
                          softmax_scale=softmax_scale, backend=backend)
    return out[:, 0]
