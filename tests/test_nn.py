"""jax_fastattn.nn against a plain-JAX attention layer written here."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_fastattn import nn

D_MODEL, HEADS, KV_HEADS, HEAD_DIM = 32, 4, 2, 8
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}


def reference_inv_freq(head_dim, theta, scaling):
    """Meta llama-models `apply_scaling`, one frequency at a time."""
    freqs = [1.0 / theta ** (i / head_dim) for i in range(0, head_dim, 2)]
    if scaling is None:
        return np.array(freqs)
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(f)
        elif wavelen > old / low:
            out.append(f / factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return np.array(out)


def reference_rope(x, positions, inv_freq):
    """Pairs (x[i], x[i + D/2]) rotated as complex numbers."""
    half = x.shape[-1] // 2
    z = x[..., :half] + 1j * x[..., half:]
    z = z * jnp.exp(1j * positions[:, :, None, None] * jnp.asarray(inv_freq))
    return jnp.concatenate([z.real, z.imag], axis=-1).astype(x.dtype)


def reference_layer(params, x, positions, inv_freq, visible, bias=None):
    """Plain attention layer: visible bool [B|1, 1, Sq, Skv]."""
    q = jnp.einsum("bsd,dhk->bshk", x, params["query"]["kernel"])
    k = jnp.einsum("bsd,dhk->bshk", x, params["key"]["kernel"])
    v = jnp.einsum("bsd,dhk->bshk", x, params["value"]["kernel"])
    q, k = reference_rope(q, positions, inv_freq), reference_rope(k, positions, inv_freq)
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias
    logits = jnp.where(visible, logits, -jnp.inf)
    probs = jax.nn.softmax(jnp.where(visible.any(-1, keepdims=True), logits, 0.0), axis=-1)
    probs = jnp.where(visible, probs, 0.0)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return jnp.einsum("bqhd,hdo->bqo", out, params["out"]["kernel"])


def visible_mask(seq, causal=True, window=None, segment_ids=None):
    i, j = np.arange(seq)[:, None], np.arange(seq)[None, :]
    keep = np.ones((seq, seq), bool)
    if causal:
        keep &= j <= i
    if window is not None:
        keep &= j > i - window
    keep = keep[None, None]
    if segment_ids is not None:
        ids = np.asarray(segment_ids)
        keep = keep & ((ids[:, :, None] == ids[:, None, :]) & (ids[:, :, None] >= 0))[:, None]
    return jnp.asarray(keep)


def make_layer(implementation, kv_heads=KV_HEADS, window=None, scaling=LLAMA3_SCALING):
    return nn.Attention(D_MODEL, HEADS, kv_heads, HEAD_DIM, rope_scaling=scaling, sliding_window=window,
                        implementation=implementation, rngs=nnx.Rngs(0))


def test_llama3_rope_frequencies():
    for scaling in (None, LLAMA3_SCALING, {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 2.0,
                                           "high_freq_factor": 8.0, "original_max_position_embeddings": 8192}):
        got = nn.rope_inv_freq(128, 500000.0, scaling)
        np.testing.assert_allclose(got, reference_inv_freq(128, 500000.0, scaling), rtol=1e-6)
    # Some frequencies are untouched, some divided by factor, some between.
    got, plain = nn.rope_inv_freq(128, 500000.0, LLAMA3_SCALING), nn.rope_inv_freq(128, 500000.0)
    assert (got == plain).any() and np.isclose(got, plain / 8).any() and not np.isclose(got, plain).all()


CASES = {
    "causal": dict(),
    "sliding": dict(window=3),
    "segments": dict(segments=True),
    "bias": dict(bias=True),
    "mqa": dict(kv_heads=1),
}


@pytest.mark.parametrize("implementation,case", [("fastattn", case) for case in CASES] +
                         [("xla", "segments"), ("xla", "sliding")])
def test_layer_matches_reference_forward_and_grad(implementation, case):
    opts = CASES[case]
    batch, seq = 2, 11
    layer = make_layer(implementation, kv_heads=opts.get("kv_heads", KV_HEADS), window=opts.get("window"))
    x = jax.random.normal(jax.random.key(1), (batch, seq, D_MODEL))
    positions = jnp.broadcast_to(jnp.arange(seq) + 3, (batch, seq))  # an offset: RoPE is relative
    segment_ids = None
    if opts.get("segments"):
        segment_ids = jnp.array([[0] * 4 + [1] * 5 + [-1] * 2, [2] * 11], jnp.int32)
    bias = jax.random.normal(jax.random.key(2), (1, HEADS, seq, seq)) if opts.get("bias") else None
    visible = visible_mask(seq, window=opts.get("window"), segment_ids=segment_ids)
    inv_freq = reference_inv_freq(HEAD_DIM, 10000.0, LLAMA3_SCALING)
    cotangent = jax.random.normal(jax.random.key(3), (batch, seq, D_MODEL))
    graphdef, params = nnx.split(layer)

    def ours(params, x):
        y = nnx.merge(graphdef, params)(x, positions=positions, segment_ids=segment_ids, bias=bias)
        return jnp.sum(y * cotangent), y

    def theirs(params, x):
        y = reference_layer(nnx.to_pure_dict(params), x, positions, inv_freq, visible, bias)
        return jnp.sum(y * cotangent), y

    (_, y), grads = jax.value_and_grad(ours, argnums=(0, 1), has_aux=True)(params, x)
    (_, y_ref), grads_ref = jax.value_and_grad(theirs, argnums=(0, 1), has_aux=True)(params, x)
    if segment_ids is not None:  # padding rows attend nothing: zeros, not NaN
        assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-4)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        np.testing.assert_allclose(got, want, atol=5e-5, rtol=1e-3)


@pytest.mark.parametrize("implementation,paged,window", [
    ("fastattn", False, None), ("fastattn", True, None), ("fastattn", True, 4), ("xla", True, None),
    ("xla", False, 4)])
def test_decode_with_cache_equals_full_prefix(implementation, paged, window):
    batch, seq, steps = 3, 14, 5
    lengths = np.array([6, 3, 9])  # ragged prompts, right-padded
    layer = make_layer(implementation, window=window)
    x = jax.random.normal(jax.random.key(4), (batch, seq, D_MODEL))
    full = layer(x)  # causal over the whole sequence: the recomputation
    if paged:
        page_size, pages_per_row = 4, 4
        table = np.random.default_rng(0).permutation(batch * pages_per_row).reshape(batch, pages_per_row)
        cache = nn.KVCache.init_paged(table, batch * pages_per_row, page_size, KV_HEADS, HEAD_DIM)
    else:
        cache = nn.KVCache.init(batch, 16, KV_HEADS, HEAD_DIM)
    prompt = jnp.where(np.arange(10)[None, :, None] < lengths[:, None, None], x[:, :10], 0.0)
    y_prompt, cache = layer.prefill(prompt, cache, lengths)
    for b in range(batch):
        np.testing.assert_allclose(y_prompt[b, :lengths[b]], full[b, :lengths[b]], atol=2e-5, rtol=1e-4)
    decode = jax.jit(lambda layer, token, cache: layer.decode(token, cache))
    for step in range(steps):
        pos = lengths + step
        token = x[np.arange(batch), pos]
        y, cache = decode(layer, token, cache)
        np.testing.assert_allclose(y, full[np.arange(batch), pos], atol=2e-5, rtol=1e-4)
    np.testing.assert_array_equal(cache.lengths, lengths + steps)


def test_attention_fn_adapter_in_flax_multihead_attention():
    x = jax.random.normal(jax.random.key(5), (2, 9, D_MODEL))
    mask = nnx.make_causal_mask(jnp.ones((2, 9)))
    make = lambda fn: nnx.MultiHeadAttention(HEADS, D_MODEL, attention_fn=fn, decode=False, rngs=nnx.Rngs(0))
    ours = make(nn.fastattn_attention_fn("cpu"))(x, mask=mask)
    flax_default = make(nnx.dot_product_attention)(x, mask=mask)
    np.testing.assert_allclose(ours, flax_default, atol=2e-5, rtol=1e-4)


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="implementation"):
        make_layer("flash")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="cudnn"):
            make_layer("cudnn")
    with pytest.raises(ValueError, match="num_heads"):
        nn.Attention(D_MODEL, 4, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="sliding_window"):
        nn.dot_product_attention(*(jnp.ones((1, 4, 2, 8)),) * 3, sliding_window=0)
    with pytest.raises(ValueError, match="rope_type"):
        nn.rope_inv_freq(8, scaling={"rope_type": "yarn"})


@pytest.mark.parametrize("implementation", ["fastattn", "xla"])
def test_attend_cache_row_of_length_zero_is_zero(implementation):
    """Every implementation returns zeros for a row that sees no key (jax's
    own attention would average every key)."""
    from jax_fastattn.nn import attend_cache
    keys = jax.random.split(jax.random.PRNGKey(41), 3)
    q = jax.random.normal(keys[0], (2, 2, 8))
    k, v = (jax.random.normal(key, (2, 8, 2, 8)) for key in keys[1:])
    lengths = jnp.array([0, 3])
    for window in (None, 2):
        out = attend_cache(q, k, v, lengths, implementation=implementation, sliding_window=window,
                           backend="cpu" if implementation == "fastattn" else "auto")
        assert np.all(np.asarray(out)[0] == 0) and np.all(np.isfinite(np.asarray(out)))
