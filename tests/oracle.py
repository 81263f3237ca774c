"""The tests' own ground truth, written apart from the library: masks are
built row by row in numpy from the mask specs (not through
jax_fastattn.masks' plan or visibility code, which the xla backend and
jax_fastattn.reference use), and attention is plain JAX in float32."""
import jax.numpy as jnp
import numpy as np

from jax_fastattn import masks


def _parts(mask):
    if mask is None:
        return []
    return list(mask.parts) if isinstance(mask, masks.And) else [mask]


def _offset(part, q_len, kv_len):
    return kv_len - q_len if part.align == "bottom_right" else 0


def visible(mask, causal, batch, heads, q_len, kv_len) -> np.ndarray:
    """bool [B, H, Sq, Skv]: True where query i may attend to key j."""
    result = np.ones((batch, heads, q_len, kv_len), bool)
    keys = np.arange(kv_len)
    parts = _parts(mask) + ([masks.Causal()] if causal else [])
    for part in parts:
        if isinstance(part, masks.Causal):
            off = _offset(part, q_len, kv_len)
            for i in range(q_len):
                result[:, :, i, :] &= keys <= i + off
        elif isinstance(part, masks.SlidingWindow):
            off = _offset(part, q_len, kv_len)
            for i in range(q_len):
                if part.left is not None:
                    result[:, :, i, :] &= keys >= i + off - part.left
                if part.right is not None:
                    result[:, :, i, :] &= keys <= i + off + part.right
        elif isinstance(part, masks.Segments):
            q_ids, kv_ids = np.asarray(part.q_ids), np.asarray(part.kv_ids)
            for b in range(batch):
                for i in range(q_len):
                    result[b, :, i, :] &= (kv_ids[b] == q_ids[b, i]) & (q_ids[b, i] >= 0)
        elif isinstance(part, masks.Dense):
            result &= np.broadcast_to(np.asarray(part.mask, bool), result.shape)
        else:
            raise TypeError(type(part))
    return result


def attention(q, k, v, *, mask=None, causal=False, bias=None, softmax_scale=None):
    """(out float32 [B, Sq, Hq, D], lse float32 [B, Hq, Sq]); a row that sees
    no key gives out 0 and lse -inf. Differentiable (jax)."""
    batch, q_len, q_heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    scale = 1.0 / np.sqrt(head_dim) if softmax_scale is None else softmax_scale
    seen = jnp.asarray(visible(mask, causal, batch, q_heads, q_len, kv_len))
    group = q_heads // kv_heads
    k = jnp.repeat(k.astype(jnp.float32), group, axis=2)
    v = jnp.repeat(v.astype(jnp.float32), group, axis=2)
    scores = jnp.einsum("bihd,bjhd->bhij", q.astype(jnp.float32), k, precision="highest") * scale
    if bias is not None:
        scores = scores + bias.astype(jnp.float32)
    scores = jnp.where(seen, scores, -jnp.inf)
    peak = jnp.max(scores, axis=-1, keepdims=True)
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    weights = jnp.where(seen, jnp.exp(scores - peak), 0.0)
    total = jnp.sum(weights, axis=-1)
    any_seen = total > 0
    safe_total = jnp.where(any_seen, total, 1.0)
    out = jnp.einsum("bhij,bjhd->bihd", weights / safe_total[..., None], v, precision="highest")
    lse = jnp.where(any_seen, peak[..., 0] + jnp.log(safe_total), -jnp.inf)
    return out, lse
