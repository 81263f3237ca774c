"""One block of context-parallel attention: a query block against a key
block under a static band, through `flash_attention(return_lse=True)`, and
its exact backward when the block is one part of a larger softmax
(`flash_attention_backward` with the merged out and lse: no forward rerun).

The kernel's masks express bands that contain the diagonal (Causal,
SlidingWindow with non-negative bounds). A block band (lo, hi) that lies
wholly above or below the diagonal is brought back to it by dropping the
leading queries that see nothing (hi < 0) or the leading keys no query sees
(lo > 0); dropped query rows come back as out = 0, lse = -inf.
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from jax_fastattn import flash_attention, flash_attention_backward, masks

from .context_schedule import Band


def empty_result(q):
    b, s, h, _ = q.shape
    return jnp.zeros(q.shape, q.dtype), jnp.full((b, h, s), -jnp.inf, jnp.float32)


def _block_parts(q_ids, kv_ids, band: Band):
    """(q_skip, kv_skip, mask) of a band that contains work: the leading
    queries that see nothing, the leading keys no query sees, and the
    kernel mask of what is left (None when nothing is masked)."""
    lo, hi = band
    q_skip = kv_skip = 0
    if hi is not None and hi < 0:      # queries ii < -hi see no key of this block
        q_skip, lo, hi = -hi, (None if lo is None else lo - hi), 0
    elif lo is not None and lo > 0:    # keys jj < lo are seen by no query of this block
        kv_skip, lo, hi = lo, 0, (None if hi is None else hi - lo)
    parts = []
    if lo is not None or hi is not None:
        parts.append(masks.SlidingWindow(None if lo is None else -lo, hi, align="top_left"))
    if q_ids is not None:
        parts.append(masks.Segments(q_ids[:, q_skip:], kv_ids[:, kv_skip:]))
    mask = None
    for part in parts:
        mask = part if mask is None else mask & part
    return q_skip, kv_skip, mask


def block_attention(q, k, v, q_ids, kv_ids, band: Optional[Band], softmax_scale: float, backend: str):
    """(out [B, Sq, H, D] in q's dtype, lse f32 [B, H, Sq]) of q against k/v
    where key jj is visible from query ii iff lo <= jj - ii <= hi (None =
    unbounded; band None = nothing visible) and, when ids are given,
    q_ids[ii] == kv_ids[jj] >= 0."""
    if band is None:
        return empty_result(q)
    q_skip, kv_skip, mask = _block_parts(q_ids, kv_ids, band)
    if q_skip >= q.shape[1] or kv_skip >= k.shape[1]:
        return empty_result(q)
    out, lse = flash_attention(q[:, q_skip:], k[:, kv_skip:], v[:, kv_skip:], mask=mask,
                               softmax_scale=softmax_scale, return_lse=True, backend=backend)
    if q_skip:
        b, _, h, d = q.shape
        out = jnp.concatenate([jnp.zeros((b, q_skip, h, d), out.dtype), out], axis=1)
        lse = jnp.concatenate([jnp.full((b, h, q_skip), -jnp.inf, jnp.float32), lse], axis=2)
    return out, lse


def block_backward(q, k, v, q_ids, kv_ids, out, lse, d_out, d_lse, *, band: Optional[Band],
                   softmax_scale: float, backend: str):
    """Gradients (f32) of a loss of the merged (out, lse) with respect to this
    block's q, k, v, given the merged out and lse and their cotangents.

    The fused backward needs only the softmax normaliser and rowsum(d_out *
    out) of each query row; given the merged lse and out (of the softmax
    over every block's keys) it yields this block's exact share:
    P_blk = exp(S_blk - lse) are the global probabilities of its keys, and
    d lse reaches them as d_lse * P_blk. `flash_attention_backward` takes
    them directly, so the block's forward is not recomputed.

    Rows whose merged lse is -inf see no key in any block: their gradients
    are zero, obtained by handing the kernel lse = +inf (P = 0).
    """
    zeros = tuple(jnp.zeros(x.shape, jnp.float32) for x in (q, k, v))
    if band is None:
        return zeros
    q_skip, kv_skip, mask = _block_parts(q_ids, kv_ids, band)
    if q_skip >= q.shape[1] or kv_skip >= k.shape[1]:
        return zeros
    rows = slice(q_skip, None)
    lse_rows = lse[:, :, rows].astype(jnp.float32)
    lse_rows = jnp.where(jnp.isfinite(lse_rows), lse_rows, jnp.inf)
    d_lse_rows = None if d_lse is None else d_lse[:, :, rows]
    d_q, d_k, d_v = flash_attention_backward(
        q[:, rows], k[:, kv_skip:], v[:, kv_skip:], out[:, rows].astype(q.dtype), lse_rows,
        d_out[:, rows].astype(q.dtype), d_lse_rows, mask=mask, softmax_scale=softmax_scale, backend=backend)
    pad = lambda g, skip: jnp.pad(g.astype(jnp.float32), ((0, 0), (skip, 0), (0, 0), (0, 0)))  # noqa: E731
    return pad(d_q, q_skip), pad(d_k, kv_skip), pad(d_v, kv_skip)
