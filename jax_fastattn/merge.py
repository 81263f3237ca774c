"""merge_partials: exact combination of attention results computed over
disjoint key sets, through their log-sum-exps.

For parts p with outputs o_p and lse_p (natural log, over the keys of part p),
attention over the union of the keys is

    lse = log sum_p exp(lse_p),    out = sum_p exp(lse_p - lse) * o_p,

the same algebra as one step of the online softmax. Parts that saw no key
(lse_p = -inf) get weight 0; a row that no part saw gets out = 0 and
lse = -inf, never NaN. Used by split-KV decode, ring attention and the
CPU-GPU cooperative (offload) attention.
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp


def _check(outs, lses):
    if len(outs) == 0 or len(outs) != len(lses):
        raise ValueError(f"outs and lses must be non-empty sequences of equal length, got {len(outs)} and "
                         f"{len(lses)}")
    shape = outs[0].shape
    for i, (o, l) in enumerate(zip(outs, lses)):
        if o.shape != shape:
            raise ValueError(f"outs[{i}] has shape {o.shape}, but outs[0] has {shape}")
        if o.ndim < 2:
            raise ValueError(f"outs[{i}] must have rank >= 2 [..., S, H, D] or [..., H, D], got {o.shape}")
    lse_shape = lses[0].shape
    for i, l in enumerate(lses):
        if l.shape != lse_shape:
            raise ValueError(f"lses[{i}] has shape {l.shape}, but lses[0] has {lse_shape}")


def merge_partials(outs: Sequence, lses: Sequence, *, lse_layout: str = "bhs", out_dtype=None):
    """Merges partial attention results over disjoint key sets.

    Args:
      outs: sequence of arrays of one shape; either flash_attention's
        [B, Sq, Hq, D] or decode's [B, Hq, D].
      lses: the matching float32 log-sum-exps: [B, Hq, Sq] for the former
        (flash_attention's `return_lse` layout, lse_layout="bhs"), [B, Hq]
        for the latter.
      lse_layout: "bhs" (lse [B, H, S] against out [B, S, H, D]) or "same"
        (lse has out's shape without its last axis). Rank-3 outs are always
        "same"; decode-shaped partials with extra leading dims ([..., B, H,
        D] with [..., B, H]) must say lse_layout="same".
      out_dtype: dtype of the merged out (default outs[0]'s); float32 keeps
        an intermediate merge that will be merged again at full precision.

    Returns:
      (out, lse): out in out_dtype, lse float32 in lses[0]'s shape.
    """
    outs, lses = list(outs), list(lses)
    _check(outs, lses)
    if lse_layout not in ("bhs", "same"):
        raise ValueError(f"lse_layout must be 'bhs' or 'same', got {lse_layout!r}")
    if outs[0].ndim == 3 or lse_layout == "same":
        expected = outs[0].shape[:-1]
        to_out = lambda x: x[..., None]  # noqa: E731
    else:
        b, s, h = outs[0].shape[-4], outs[0].shape[-3], outs[0].shape[-2]
        expected = outs[0].shape[:-4] + (b, h, s)
        to_out = lambda x: jnp.swapaxes(x, -1, -2)[..., None]  # noqa: E731  [.., B, H, S] -> [.., B, S, H, 1]
    if lses[0].shape != expected:
        raise ValueError(f"lses must have shape {expected} for outs of shape {outs[0].shape}, got "
                         f"{lses[0].shape}")
    stacked = jnp.stack([l.astype(jnp.float32) for l in lses])          # [P, ...]
    row_max = jnp.max(stacked, axis=0)
    safe_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.exp(stacked - safe_max)                                # 0 for -inf parts
    total = jnp.sum(weights, axis=0)
    seen = total > 0
    lse = jnp.where(seen, safe_max + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)
    norm = jnp.where(seen, total, 1.0)
    out = sum(to_out(w / norm) * o.astype(jnp.float32) for w, o in zip(weights, outs))
    return out.astype(outs[0].dtype if out_dtype is None else out_dtype), lse
