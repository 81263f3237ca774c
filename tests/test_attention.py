"""The numeric suite: every kernel backend against jax_fastattn.reference.

Backends come from the `backend` fixture (conftest.py): the CPU custom call
and the pure-JAX blockwise backend, each at production and at small tiles.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_fastattn import flash_attention, masks
from helpers import GRAD_TOLERANCE, assert_close, random_qkv

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


def reference(q, k, v, **kwargs):
    """The reference on float32 copies of the same (already rounded) inputs."""
    up = lambda x: None if x is None else x.astype(jnp.float32)
    kwargs = dict(kwargs)
    if kwargs.get("bias") is not None:
        kwargs["bias"] = up(kwargs["bias"])
    return flash_attention(up(q), up(k), up(v), backend="reference", **kwargs)


def check_forward(backend, q, k, v, **kwargs):
    out, lse = flash_attention(q, k, v, backend=backend, return_lse=True, **kwargs)
    ref_out, ref_lse = reference(q, k, v, return_lse=True, **kwargs)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == jnp.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert_close(out, ref_out, q.dtype, what="out")
    assert_close(lse, ref_lse, q.dtype, what="lse")
    return out, lse


def check_gradients(backend, q, k, v, bias=None, **kwargs):
    """Gradients of a loss using both out and lse, in q, k, v (and bias)."""
    cot_key = jax.random.PRNGKey(7)
    d_out = jax.random.normal(cot_key, q.shape, jnp.float32)
    d_lse = jax.random.normal(jax.random.fold_in(cot_key, 1), (q.shape[0], q.shape[2], q.shape[1]))

    def loss(fn, q, k, v, bias):
        out, lse = fn(q, k, v, bias)
        lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
        return jnp.sum(out.astype(jnp.float32) * d_out) + jnp.sum(lse * d_lse)

    ours = lambda q, k, v, b: flash_attention(q, k, v, bias=b, backend=backend, return_lse=True, **kwargs)
    ref = lambda q, k, v, b: reference(q, k, v, bias=b, return_lse=True, **kwargs)
    argnums = (0, 1, 2, 3) if bias is not None else (0, 1, 2)
    grads = jax.grad(lambda *a: loss(ours, *a), argnums)(q, k, v, bias)
    up = lambda x: None if x is None else x.astype(jnp.float32)
    ref_grads = jax.grad(lambda *a: loss(ref, *a), argnums)(up(q), up(k), up(v), up(bias))
    tol = GRAD_TOLERANCE[jnp.dtype(q.dtype).name]
    for name, g, r in zip("q k v bias".split(), grads, ref_grads):
        assert g.dtype == (q.dtype if name != "bias" else bias.dtype)
        assert_close(g, r, q.dtype, tolerance=tol, what=f"d{name}")


@pytest.mark.parametrize("q_len,kv_len", [(1, 1), (7, 7), (63, 129), (129, 63), (257, 257)])
@pytest.mark.parametrize("head_dim", [8, 40, 64])
def test_shapes_float32(backend, q_len, kv_len, head_dim):
    q, k, v = random_qkv(0, 2, q_len, kv_len, 4, 2, head_dim)
    check_forward(backend, q, k, v)
    check_forward(backend, q, k, v, causal=True)


@pytest.mark.parametrize("head_dim", [80, 128, 256, 1, 3])
def test_head_dims(backend, head_dim):
    q, k, v = random_qkv(1, 1, 33, 65, 2, 1, head_dim)
    check_forward(backend, q, k, v, causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
def test_dtypes_and_head_groups(backend, dtype, heads):
    q, k, v = random_qkv(2, 2, 45, 77, heads[0], heads[1], 64, dtype)
    check_forward(backend, q, k, v)
    check_forward(backend, q, k, v, causal=True)


def _segments(seed, batch, q_len, kv_len, with_padding=True):
    rng = np.random.default_rng(seed)
    q_ids = np.sort(rng.integers(0, 3, (batch, q_len)), axis=1)
    kv_ids = np.sort(rng.integers(0, 3, (batch, kv_len)), axis=1)
    if with_padding:
        q_ids[:, -3:] = -1  # padded queries: see nothing
        kv_ids[:, -5:] = -1
    return jnp.asarray(q_ids, jnp.int32), jnp.asarray(kv_ids, jnp.int32)


def _mask_cases(batch, heads, q_len, kv_len):
    q_ids, kv_ids = _segments(3, batch, q_len, kv_len)
    dense = jax.random.bernoulli(jax.random.PRNGKey(4), 0.7, (batch, 1, q_len, kv_len))
    dense_heads = jax.random.bernoulli(jax.random.PRNGKey(5), 0.5, (1, heads, q_len, kv_len))
    return {
        "causal": masks.Causal(),
        "causal_top_left": masks.Causal(align="top_left"),
        "window": masks.SlidingWindow(9, 3),
        "window_left_only": masks.SlidingWindow(20, None),
        "window_top_left": masks.SlidingWindow(5, 5, align="top_left"),
        "segments": masks.Segments(q_ids, kv_ids),
        "dense": masks.Dense(dense),
        "dense_per_head": masks.Dense(dense_heads),
        "causal&segments": masks.Causal() & masks.Segments(q_ids, kv_ids),
        "window&dense": masks.SlidingWindow(12, 0) & masks.Dense(dense),
        "segments&segments": masks.Segments(q_ids, kv_ids) & masks.Segments(q_ids % 2, kv_ids % 2),
    }


@pytest.mark.parametrize("mask_name", list(_mask_cases(2, 4, 3, 3)))
@pytest.mark.parametrize("q_len,kv_len", [(50, 50), (37, 90)])
def test_masks(backend, mask_name, q_len, kv_len):
    q, k, v = random_qkv(5, 2, q_len, kv_len, 4, 2, 32)
    mask = _mask_cases(2, 4, q_len, kv_len)[mask_name]
    check_forward(backend, q, k, v, mask=mask)


def test_causal_flag_with_mask_is_intersection(backend):
    q, k, v = random_qkv(6, 1, 40, 40, 2, 2, 16)
    window = masks.SlidingWindow(None, 10)
    ours = flash_attention(q, k, v, mask=window, causal=True, backend=backend)
    both = flash_attention(q, k, v, mask=window & masks.Causal(), backend="reference")
    assert_close(ours, both, jnp.float32)


def test_fully_masked_rows_are_zero_not_nan(backend):
    q, k, v = random_qkv(7, 2, 20, 30, 2, 2, 16)
    dense = np.ones((2, 1, 20, 30), bool)
    dense[0, 0, 3] = False   # one row sees nothing
    dense[1, 0, :] = False   # a whole batch row sees nothing
    out, lse = check_forward(backend, q, k, v, mask=masks.Dense(jnp.asarray(dense)))
    assert np.all(np.asarray(out)[0, 3] == 0) and np.all(np.asarray(out)[1] == 0)
    assert np.all(np.asarray(lse)[0, :, 3] == -np.inf)
    grads = jax.grad(lambda q, k, v: jnp.sum(flash_attention(
        q, k, v, mask=masks.Dense(jnp.asarray(dense)), backend=backend) ** 2), (0, 1, 2))(q, k, v)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
    assert np.all(np.asarray(grads[0])[1] == 0)
    # Top-left causal with Sq > Skv leaves no row empty; bottom-right does.
    q2, k2, v2 = random_qkv(8, 1, 12, 5, 2, 2, 16)
    out2, _ = check_forward(backend, q2, k2, v2, causal=True)
    assert np.all(np.asarray(out2)[:, :7] == 0)


@pytest.mark.parametrize("bias_shape", [(2, 4, 33, 47), (1, 4, 33, 47), (2, 1, 33, 47), (1, 1, 33, 47)])
def test_bias(backend, bias_shape):
    q, k, v = random_qkv(9, 2, 33, 47, 4, 2, 24)
    bias = jax.random.normal(jax.random.PRNGKey(10), bias_shape)
    check_forward(backend, q, k, v, bias=bias)
    check_forward(backend, q, k, v, bias=bias, causal=True)


def test_alibi_style_bias_bfloat16(backend):
    q, k, v = random_qkv(11, 1, 40, 40, 4, 4, 32, jnp.bfloat16)
    slopes = 2.0 ** -jnp.arange(1, 5)
    distance = jnp.arange(40)[None, :] - jnp.arange(40)[:, None]
    bias = (slopes[:, None, None] * distance[None]).astype(jnp.bfloat16)[None]
    check_forward(backend, q, k, v, bias=bias, causal=True)


def test_softmax_scale(backend):
    q, k, v = random_qkv(12, 1, 20, 20, 2, 2, 16)
    check_forward(backend, q, k, v, softmax_scale=0.3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_every_dtype(backend, dtype):
    q, k, v = random_qkv(13, 2, 37, 45, 4, 2, 32, dtype)
    check_gradients(backend, q, k, v)
    check_gradients(backend, q, k, v, causal=True)


@pytest.mark.parametrize("mask_name", ["causal", "window", "segments", "dense", "causal&segments"])
def test_gradients_masks(backend, mask_name):
    q, k, v = random_qkv(14, 2, 41, 53, 4, 1, 16)
    check_gradients(backend, q, k, v, mask=_mask_cases(2, 4, 41, 53)[mask_name])


@pytest.mark.parametrize("bias_shape", [(2, 4, 29, 35), (1, 1, 29, 35), (2, 1, 29, 35)])
def test_gradients_bias(backend, bias_shape):
    q, k, v = random_qkv(15, 2, 29, 35, 4, 2, 16)
    bias = jax.random.normal(jax.random.PRNGKey(16), bias_shape)
    check_gradients(backend, q, k, v, bias=bias, causal=True)


def test_jit_and_checkpoint(backend):
    q, k, v = random_qkv(17, 2, 30, 30, 2, 2, 16)
    fn = jax.jit(lambda q, k, v: flash_attention(q, k, v, causal=True, backend=backend))
    assert_close(fn(q, k, v), reference(q, k, v, causal=True), jnp.float32)
    loss = lambda q, k, v: jnp.sum(jax.checkpoint(
        lambda q, k, v: flash_attention(q, k, v, causal=True, backend=backend))(q, k, v) ** 2)
    ref_loss = lambda q, k, v: jnp.sum(reference(q, k, v, causal=True) ** 2)
    for g, r in zip(jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v), jax.grad(ref_loss, (0, 1, 2))(q, k, v)):
        assert_close(g, r, jnp.float32, tolerance=1e-4)


def test_traced_segment_ids_under_jit(backend):
    q, k, v = random_qkv(18, 2, 40, 40, 2, 2, 16)
    q_ids, kv_ids = _segments(19, 2, 40, 40)

    @jax.jit
    def fn(q, k, v, q_ids, kv_ids):
        return flash_attention(q, k, v, mask=masks.Segments(q_ids, kv_ids), backend=backend)

    assert_close(fn(q, k, v, q_ids, kv_ids), reference(q, k, v, mask=masks.Segments(q_ids, kv_ids)), jnp.float32)


@pytest.mark.parametrize("in_axes", [(0, 0, 0), (0, None, None), (None, 0, 0)])
def test_vmap(backend, in_axes):
    """vmap over an extra leading axis (size 3), batch 2 inside."""
    q, k, v = random_qkv(20, 6, 21, 34, 4, 2, 16)
    shaped = lambda x, ax: x.reshape(3, 2, *x.shape[1:]) if ax == 0 else x[:2]
    qs, ks, vs = (shaped(x, ax) for x, ax in zip((q, k, v), in_axes))
    fn = lambda q, k, v: flash_attention(q, k, v, causal=True, backend=backend)
    out = jax.vmap(fn, in_axes=in_axes)(qs, ks, vs)
    expected = jax.vmap(lambda q, k, v: reference(q, k, v, causal=True), in_axes=in_axes)(qs, ks, vs)
    assert_close(out, expected, jnp.float32)


def test_vmap_with_batched_segments_and_grad(backend):
    q, k, v = random_qkv(21, 6, 24, 24, 2, 2, 16)
    q_ids, kv_ids = _segments(22, 6, 24, 24)
    split = lambda x: x.reshape(3, 2, *x.shape[1:])

    def per_example_loss(fn):
        def loss(q, k, v, q_ids, kv_ids):
            return jnp.sum(fn(q, k, v, mask=masks.Segments(q_ids, kv_ids)) ** 2)
        return jax.vmap(jax.grad(loss, (0, 1, 2)))

    ours = per_example_loss(lambda *a, **kw: flash_attention(*a, backend=backend, **kw))
    ref = per_example_loss(reference)
    args = [split(x) for x in (q, k, v, q_ids, kv_ids)]
    for g, r in zip(jax.jit(ours)(*args), ref(*args)):
        assert_close(g, r, jnp.float32, tolerance=1e-4)


def test_backends_agree_with_each_other():
    """The CPU kernel and the pure-JAX backend compute the same function."""
    q, k, v = random_qkv(23, 2, 100, 130, 8, 2, 64, jnp.bfloat16)
    a = flash_attention(q, k, v, causal=True, backend="cpu")
    b = flash_attention(q, k, v, causal=True, backend="xla")
    assert_close(a, b, jnp.bfloat16)
