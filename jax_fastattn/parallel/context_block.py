"""One block of context-parallel attention: a query block against a key
block under a static band, through `flash_attention(return_lse=True)`, and
its exact backward when the block is one part of a larger softmax.

The kernel's masks express bands that contain the diagonal (Causal,
SlidingWindow with non-negative bounds). A block band (lo, hi) that lies
wholly above or below the diagonal is brought back to it by dropping the
leading queries that see nothing (hi < 0) or the leading keys no query sees
(lo > 0); dropped query rows come back as out = 0, lse = -inf.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jax_fastattn import flash_attention, masks

from .context_schedule import Band


def empty_result(q):
    b, s, h, _ = q.shape
    return jnp.zeros(q.shape, q.dtype), jnp.full((b, h, s), -jnp.inf, jnp.float32)


def block_attention(q, k, v, q_ids, kv_ids, band: Optional[Band], softmax_scale: float, backend: str):
    """(out [B, Sq, H, D] in q's dtype, lse f32 [B, H, Sq]) of q against k/v
    where key jj is visible from query ii iff lo <= jj - ii <= hi (None =
    unbounded; band None = nothing visible) and, when ids are given,
    q_ids[ii] == kv_ids[jj] >= 0."""
    if band is None:
        return empty_result(q)
    lo, hi = band
    q_skip = kv_skip = 0
    if hi is not None and hi < 0:      # queries ii < -hi see no key of this block
        q_skip, lo, hi = -hi, (None if lo is None else lo - hi), 0
    elif lo is not None and lo > 0:    # keys jj < lo are seen by no query of this block
        kv_skip, lo, hi = lo, 0, (None if hi is None else hi - lo)
    if q_skip >= q.shape[1] or kv_skip >= k.shape[1]:
        return empty_result(q)
    q_part = q[:, q_skip:]
    k_part, v_part = k[:, kv_skip:], v[:, kv_skip:]
    parts = []
    if lo is not None or hi is not None:
        parts.append(masks.SlidingWindow(None if lo is None else -lo, hi, align="top_left"))
    if q_ids is not None:
        parts.append(masks.Segments(q_ids[:, q_skip:], kv_ids[:, kv_skip:]))
    mask = None
    for part in parts:
        mask = part if mask is None else mask & part
    out, lse = flash_attention(q_part, k_part, v_part, mask=mask, softmax_scale=softmax_scale,
                               return_lse=True, backend=backend)
    if q_skip:
        b, _, h, d = q.shape
        out = jnp.concatenate([jnp.zeros((b, q_skip, h, d), out.dtype), out], axis=1)
        lse = jnp.concatenate([jnp.full((b, h, q_skip), -jnp.inf, jnp.float32), lse], axis=2)
    return out, lse


def block_backward(q, k, v, q_ids, kv_ids, out, lse, d_out, d_lse, *, band: Optional[Band],
                   softmax_scale: float, backend: str):
    """Gradients (f32) of a loss of the merged (out, lse) with respect to this
    block's q, k, v, given the merged out and lse and their cotangents.

    With w = exp(lse_blk - lse), the merged result is out = sum_blk w o_blk and
    lse = log sum_blk exp(lse_blk), so the block's cotangents are
      d o_blk   = w d_out,
      d lse_blk = w (sum_d d_out (o_blk - out) + d_lse),
    fed to the block's own vjp (which recomputes the block forward). Exact:
    the kernel backward's rowsum(d o_blk * o_blk) term cancels against the
    first part of d lse_blk, leaving the global rowsum(d_out * out).
    """
    if band is None:
        return tuple(jnp.zeros(x.shape, jnp.float32) for x in (q, k, v))

    def attend(q, k, v):
        return block_attention(q, k, v, q_ids, kv_ids, band, softmax_scale, backend)

    (o_blk, lse_blk), vjp = jax.vjp(attend, q, k, v)
    seen = jnp.isfinite(lse_blk) & jnp.isfinite(lse)
    weight = jnp.where(seen, jnp.exp(jnp.where(seen, lse_blk - lse, 0.0)), 0.0)       # [B, H, S]
    weight_rows = jnp.swapaxes(weight, 1, 2)[..., None]                                 # [B, S, H, 1]
    d_out32 = d_out.astype(jnp.float32)
    d_o_blk = (weight_rows * d_out32).astype(o_blk.dtype)
    row_dot = jnp.sum(d_out32 * (o_blk.astype(jnp.float32) - out.astype(jnp.float32)), axis=-1)  # [B, S, H]
    d_lse_blk = weight * (jnp.swapaxes(row_dot, 1, 2) + d_lse.astype(jnp.float32))
    return tuple(g.astype(jnp.float32) for g in vjp((d_o_blk, d_lse_blk)))
