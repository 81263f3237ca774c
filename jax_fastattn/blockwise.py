"""Pure-JAX online-softmax attention (backend "xla").

FlashAttention-2's algorithm written with `lax.map` over q tiles and
`lax.fori_loop` over kv tiles, so memory is O(S) (one logits tile at a time),
never the [Sq, Skv] matrix. The mask plan's tile classes drive a
`lax.switch` per tile pair: EMPTY tiles are skipped, FULL tiles run without
the element-wise mask, PARTIAL tiles apply it. A tile is skipped only if it
is empty for every batch row and head, since all of them are processed
together here. Runs anywhere JAX runs; it is also the fallback reference
for the kernels' structure.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from . import masks
from .sharding import vary_like

_HIGHEST = lax.Precision.HIGHEST


def _tile_plan(plan, tile_q, tile_kv):
    """[nq, nk] classes shared by every batch row and head."""
    classes = masks.classify_tiles(plan, tile_q, tile_kv)
    any_visible = jnp.max(classes, axis=(0, 1))
    all_full = jnp.min(classes, axis=(0, 1))
    return jnp.where(any_visible == masks.EMPTY, masks.EMPTY,
                     jnp.where(all_full == masks.FULL, masks.FULL, masks.PARTIAL)).astype(jnp.int32)


def _pad_to(x, axis, size, value=0):
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


class _Tiles:
    """Padded inputs and per-tile slicing shared by forward and backward."""

    def __init__(self, q, k, v, bias, plan, tile_q, tile_kv):
        self.batch, self.q_len, self.q_heads, self.head_dim = q.shape
        # Short queries (decode: Sq = 1) get a short q tile, not 256 rows of padding.
        tile_q = min(tile_q, -(-self.q_len // 8) * 8)
        self.kv_len, self.kv_heads = k.shape[1], k.shape[2]
        self.group = self.q_heads // self.kv_heads
        self.tile_q, self.tile_kv = tile_q, tile_kv
        self.nq = -(-self.q_len // tile_q)
        self.nk = -(-self.kv_len // tile_kv)
        self.q_pad, self.kv_pad = self.nq * tile_q, self.nk * tile_kv
        self.plan = plan
        self.classes = _tile_plan(plan, tile_q, tile_kv)
        self.k = _pad_to(k.astype(jnp.float32), 1, self.kv_pad)
        self.v = _pad_to(v.astype(jnp.float32), 1, self.kv_pad)
        self.bias = None
        if bias is not None:
            self.bias = _pad_to(_pad_to(bias.astype(jnp.float32), 2, self.q_pad), 3, self.kv_pad)
        self.dense = None
        if plan.dense is not None:
            self.dense = _pad_to(_pad_to(plan.dense, 2, self.q_pad, False), 3, self.kv_pad, False)
        self.q_ids = self.kv_ids = None
        if plan.q_segment_ids is not None:
            self.q_ids = _pad_to(plan.q_segment_ids, 1, self.q_pad, -1)
            self.kv_ids = _pad_to(plan.kv_segment_ids, 1, self.kv_pad, -1)
        self.kv_tail = self.kv_pad != self.kv_len

    def q_rows(self, x, qt):
        """x [B, q_pad, ...] -> rows of q tile qt."""
        return lax.dynamic_slice_in_dim(x, qt * self.tile_q, self.tile_q, axis=1)

    def kv_rows(self, x, kt):
        return lax.dynamic_slice_in_dim(x, kt * self.tile_kv, self.tile_kv, axis=1)

    def _heads(self, x):
        """[B|1, Hq|1, tq, tk] -> [B|1, Hkv|1, g|1, tq, tk] to match logits."""
        if x.shape[1] == 1:
            return x[:, :, None]
        return x.reshape(x.shape[0], self.kv_heads, self.group, *x.shape[2:])

    def _square(self, x, qt, kt):
        x = lax.dynamic_slice_in_dim(x, qt * self.tile_q, self.tile_q, axis=2)
        return lax.dynamic_slice_in_dim(x, kt * self.tile_kv, self.tile_kv, axis=3)

    def logits(self, q_scaled, k_tile, qt, kt, masked):
        """scale*q k^T + bias, masked, as [B, Hkv, g, tq, tk]."""
        s = jnp.einsum("bqhgd,bkhd->bhgqk", q_scaled, k_tile, precision=_HIGHEST)
        if self.bias is not None:
            s = s + self._heads(self._square(self.bias, qt, kt))
        kv_index = kt * self.tile_kv + jnp.arange(self.tile_kv)
        if masked:
            q_index = qt * self.tile_q + jnp.arange(self.tile_q)
            dense_tile = None if self.dense is None else self._square(self.dense, qt, kt)
            q_ids = None if self.q_ids is None else self.q_rows(self.q_ids, qt)
            kv_ids = None if self.kv_ids is None else self.kv_rows(self.kv_ids, kt)
            seen = masks.visible(self.plan, q_index, kv_index, dense_tile, q_ids, kv_ids)
            s = jnp.where(self._heads(seen), s, -jnp.inf)
        elif self.kv_tail:
            s = jnp.where(kv_index < self.kv_len, s, -jnp.inf)
        return s

    def v_tile(self, kt, masked):
        """V rows of tile kt; padding keys (negative segment id) zeroed so that
        garbage there never reaches the result."""
        v_tile = self.kv_rows(self.v, kt)
        if masked and self.kv_ids is not None:
            v_tile = jnp.where((self.kv_rows(self.kv_ids, kt) >= 0)[:, :, None, None], v_tile, 0.0)
        return v_tile


def forward(q, k, v, bias, plan: masks.MaskPlan, softmax_scale: float, tile_q: int = 256, tile_kv: int = 512):
    """out [B, Sq, Hq, D] in q's dtype, lse float32 [B, Hq, Sq]."""
    t = _Tiles(q, k, v, bias, plan, tile_q, tile_kv)
    b, hk, g, tq, d = t.batch, t.kv_heads, t.group, t.tile_q, t.head_dim
    q_all = _pad_to(q.astype(jnp.float32) * softmax_scale, 1, t.q_pad).reshape(b, t.q_pad, hk, g, d)
    inputs = (q, k, v, bias, plan.q_segment_ids, plan.kv_segment_ids, plan.dense)

    def q_tile_step(qt):
        q_scaled = t.q_rows(q_all, qt)

        def update(carry, kt, masked):
            row_max, row_sum, acc = carry
            s = t.logits(q_scaled, t.kv_rows(t.k, kt), qt, kt, masked)
            new_max = jnp.maximum(row_max, jnp.max(s, axis=-1))
            safe_max = jnp.where(new_max == -jnp.inf, 0.0, new_max)
            probs = jnp.exp(s - safe_max[..., None])
            correction = jnp.exp(row_max - safe_max)
            row_sum = row_sum * correction + jnp.sum(probs, axis=-1)
            pv = jnp.einsum("bhgqk,bkhd->bhgqd", probs, t.v_tile(kt, masked), precision=_HIGHEST)
            return new_max, row_sum, acc * correction[..., None] + pv

        def kv_step(kt, carry):
            branches = [lambda c: c, lambda c: update(c, kt, True), lambda c: update(c, kt, False)]
            return lax.switch(t.classes[qt, kt], branches, carry)

        init = vary_like((jnp.full((b, hk, g, tq), -jnp.inf, jnp.float32), jnp.zeros((b, hk, g, tq), jnp.float32),
                          jnp.zeros((b, hk, g, tq, d), jnp.float32)), *inputs)
        row_max, row_sum, acc = lax.fori_loop(0, t.nk, kv_step, init)
        seen = row_sum > 0
        out = jnp.where(seen[..., None], acc / jnp.where(seen, row_sum, 1.0)[..., None], 0.0)
        lse = jnp.where(seen, row_max + jnp.log(jnp.where(seen, row_sum, 1.0)), -jnp.inf)
        return out, lse

    out, lse = lax.map(q_tile_step, jnp.arange(t.nq))  # [nq, B, Hkv, g, tq, (D)]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, t.q_pad, t.q_heads, d)[:, :t.q_len]
    lse = lse.transpose(1, 2, 3, 0, 4).reshape(b, t.q_heads, t.q_pad)[:, :, :t.q_len]
    return out.astype(q.dtype), lse


def backward(q, k, v, bias, plan: masks.MaskPlan, softmax_scale: float, out, lse, d_out, d_lse,
             tile_q: int = 256, tile_kv: int = 512):
    """(dq, dk, dv, dbias) with dbias float32 [B, Hq, Sq, Skv] (or None)."""
    t = _Tiles(q, k, v, bias, plan, tile_q, tile_kv)
    b, hk, g, tq, d = t.batch, t.kv_heads, t.group, t.tile_q, t.head_dim
    f32 = jnp.float32
    q_all = _pad_to(q.astype(f32) * softmax_scale, 1, t.q_pad).reshape(b, t.q_pad, hk, g, d)
    do_all = _pad_to(d_out.astype(f32), 1, t.q_pad).reshape(b, t.q_pad, hk, g, d)
    delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(f32), out.astype(f32), precision=_HIGHEST)
    if d_lse is not None:
        delta = delta - d_lse
    # Rows past Sq get lse = -inf: they contribute nothing.
    lse_all = _pad_to(lse, 2, t.q_pad, -jnp.inf).reshape(b, hk, g, t.q_pad)
    delta_all = _pad_to(delta, 2, t.q_pad).reshape(b, hk, g, t.q_pad)

    def q_tile_step(carry, qt):
        q_scaled, d_o = t.q_rows(q_all, qt), t.q_rows(do_all, qt)
        rows = lambda x: lax.dynamic_slice_in_dim(x, qt * tq, tq, axis=3)
        lse_t, delta_t = rows(lse_all), rows(delta_all)

        def update(inner, kt, masked):
            d_q, d_k, d_v, d_bias = inner
            k_tile, v_tile = t.kv_rows(t.k, kt), t.v_tile(kt, masked)
            s = t.logits(q_scaled, k_tile, qt, kt, masked)
            probs = jnp.where(lse_t[..., None] == -jnp.inf, 0.0, jnp.exp(s - lse_t[..., None]))
            d_probs = jnp.einsum("bqhgd,bkhd->bhgqk", d_o, v_tile, precision=_HIGHEST)
            d_s = probs * (d_probs - delta_t[..., None])
            d_q = d_q + jnp.einsum("bhgqk,bkhd->bqhgd", d_s, k_tile, precision=_HIGHEST)
            add_rows = lambda acc, upd: lax.dynamic_update_slice_in_dim(
                acc, t.kv_rows(acc, kt) + upd, kt * t.tile_kv, axis=1)
            d_v = add_rows(d_v, jnp.einsum("bhgqk,bqhgd->bkhd", probs, d_o, precision=_HIGHEST))
            d_k = add_rows(d_k, jnp.einsum("bhgqk,bqhgd->bkhd", d_s, q_scaled, precision=_HIGHEST))
            if d_bias is not None:
                tile = d_s.reshape(b, t.q_heads, tq, t.tile_kv)
                d_bias = lax.dynamic_update_slice(d_bias, tile, (0, 0, qt * tq, kt * t.tile_kv))
            return d_q, d_k, d_v, d_bias

        def kv_step(kt, inner):
            branches = [lambda c: c, lambda c: update(c, kt, True), lambda c: update(c, kt, False)]
            return lax.switch(t.classes[qt, kt], branches, inner)

        d_k, d_v, d_bias = carry
        (d_q,) = vary_like((jnp.zeros((b, tq, hk, g, d), f32),), *inputs)
        d_q, d_k, d_v, d_bias = lax.fori_loop(0, t.nk, kv_step, (d_q, d_k, d_v, d_bias))
        return (d_k, d_v, d_bias), d_q

    inputs = (q, k, v, bias, out, lse, d_out, d_lse, plan.q_segment_ids, plan.kv_segment_ids, plan.dense)
    init = vary_like((jnp.zeros((b, t.kv_pad, hk, d), f32), jnp.zeros((b, t.kv_pad, hk, d), f32),
                      None if bias is None else jnp.zeros((b, t.q_heads, t.q_pad, t.kv_pad), f32)), *inputs)
    (d_k, d_v, d_bias), d_q = lax.scan(q_tile_step, init, jnp.arange(t.nq))
    d_q = (d_q * softmax_scale).transpose(1, 0, 2, 3, 4, 5).reshape(b, t.q_pad, t.q_heads, d)[:, :t.q_len]
    d_k = d_k[:, :t.kv_len]
    d_v = d_v[:, :t.kv_len]
    if d_bias is not None:
        d_bias = d_bias[:, :, :t.q_len, :t.kv_len]
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), d_bias
