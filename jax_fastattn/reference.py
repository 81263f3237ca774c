"""Plain-JAX attention in float32: the ground truth every kernel is tested
against. Materialises the [B, H, Sq, Skv] logits; not for production."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from . import masks


def attention_reference(q, k, v, plan: masks.MaskPlan, bias=None, softmax_scale: float = 1.0):
    """out [B, Sq, Hq, D] (q's dtype) and lse float32 [B, Hq, Sq].

    A query row that sees no key gives out = 0 and lse = -inf.
    """
    group = q.shape[2] // k.shape[2]
    qf, kf, vf = (x.astype(jnp.float32) for x in (q, k, v))
    kf = jnp.repeat(kf, group, axis=2)  # q head h reads kv head h // group
    vf = jnp.repeat(vf, group, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", qf, kf, precision=jax.lax.Precision.HIGHEST) * softmax_scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    visible = masks.materialize(plan)
    logits = jnp.where(visible, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    safe_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.exp(logits - safe_max)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    probs = jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0), 0.0)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, vf, precision=jax.lax.Precision.HIGHEST)
    lse = jnp.where(total[..., 0] > 0, safe_max[..., 0] + jnp.log(jnp.where(total[..., 0] > 0, total[..., 0], 1.0)),
                    -jnp.inf)
    return out.astype(q.dtype), lse
