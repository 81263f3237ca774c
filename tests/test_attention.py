"""The shared numeric suite: every backend configuration (conftest.CASES:
cpu, xla and reference here; cuda, volta and auto on a GPU with
`pytest -m gpu`) against the tests' own oracle (tests/oracle.py), forward,
lse and gradients, on odd shapes, every dtype, GQA, every mask kind, bias,
jit, checkpoint, vmap and sharding. A combination a backend does not take
(per jax_fastattn.backends) must raise ArgumentError naming the argument."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import oracle
from helpers import GRAD_TOLERANCE, TOLERANCE, assert_close, random_qkv
from jax_fastattn import flash_attention, flash_attention_backward, masks
from jax_fastattn.errors import ArgumentError

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


def attend(case, q, k, v, **kwargs):
    return flash_attention(q, k, v, backend=case.backend, config=case.config, **kwargs)


def expect_unsupported(case, q, k, v, **kwargs):
    """A combination the backend does not take raises, naming what is wrong."""
    with pytest.raises(ArgumentError, match=rf"backend='{case.backend}'.*(dtype|q\.shape\[-1\])"):
        attend(case, q, k, v, **kwargs)


def check_forward(case, q, k, v, **kwargs):
    if not case.supports(q.dtype, q.shape[-1]):
        return expect_unsupported(case, q, k, v, **kwargs)
    # Each side compiled as one program (eager dispatch would compile every
    # small op on its own, which dominates the suite's time on a GPU).
    out, lse = jax.jit(lambda q, k, v: attend(case, q, k, v, return_lse=True, **kwargs))(q, k, v)
    ref_out, ref_lse = jax.jit(lambda q, k, v: oracle.attention(q, k, v, **kwargs))(q, k, v)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == jnp.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert_close(out, ref_out, q.dtype, what="out")
    assert_close(lse, ref_lse, q.dtype, what="lse")
    return out, lse


def check_gradients(case, q, k, v, bias=None, **kwargs):
    """Gradients of a loss that uses both out and lse, in q, k, v (and bias)."""
    if not case.supports(q.dtype, q.shape[-1]):
        return expect_unsupported(case, q, k, v, **kwargs)
    cot_key = jax.random.PRNGKey(7)
    d_out = jax.random.normal(cot_key, q.shape, jnp.float32)
    d_lse = jax.random.normal(jax.random.fold_in(cot_key, 1), (q.shape[0], q.shape[2], q.shape[1]))

    def loss(fn, q, k, v, bias):
        out, lse = fn(q, k, v, bias)
        lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
        return jnp.sum(out.astype(jnp.float32) * d_out) + jnp.sum(lse * d_lse)

    ours = lambda q, k, v, b: attend(case, q, k, v, bias=b, return_lse=True, **kwargs)
    ref = lambda q, k, v, b: oracle.attention(q, k, v, bias=b, **kwargs)
    argnums = (0, 1, 2, 3) if bias is not None else (0, 1, 2)
    grads = jax.jit(jax.grad(lambda *a: loss(ours, *a), argnums))(q, k, v, bias)
    up = lambda x: None if x is None else x.astype(jnp.float32)
    ref_grads = jax.jit(jax.grad(lambda *a: loss(ref, *a), argnums))(up(q), up(k), up(v), up(bias))
    tol = GRAD_TOLERANCE[jnp.dtype(q.dtype).name]
    for name, g, r in zip("q k v bias".split(), grads, ref_grads):
        assert g.dtype == (q.dtype if name != "bias" else bias.dtype)
        assert_close(g, r, q.dtype, tolerance=tol, what=f"d{name}")


@pytest.mark.parametrize("q_len,kv_len", [(1, 1), (7, 7), (63, 129), (129, 63), (257, 257)])
@pytest.mark.parametrize("head_dim", [8, 40, 64])
def test_shapes(case, q_len, kv_len, head_dim):
    q, k, v = random_qkv(0, 2, q_len, kv_len, 4, 2, head_dim, case.dtype)
    check_forward(case, q, k, v)
    check_forward(case, q, k, v, causal=True)


@pytest.mark.parametrize("head_dim", [80, 96, 128, 200, 256, 1, 3])
def test_head_dims(case, head_dim):
    q, k, v = random_qkv(1, 1, 33, 65, 2, 1, head_dim, case.dtype)
    check_forward(case, q, k, v, causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
def test_dtypes_and_head_groups(case, dtype, heads):
    q, k, v = random_qkv(2, 2, 45, 77, heads[0], heads[1], 64, dtype)
    check_forward(case, q, k, v)
    check_forward(case, q, k, v, causal=True)


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
        "diagonal": masks.SlidingWindow(0, 0),
        "segments": masks.Segments(q_ids, kv_ids),
        "dense": masks.Dense(dense),
        "dense_per_head": masks.Dense(dense_heads),
        "causal&segments": masks.Causal() & masks.Segments(q_ids, kv_ids),
        "window&dense": masks.SlidingWindow(12, 0) & masks.Dense(dense),
        "segments&segments": masks.Segments(q_ids, kv_ids) & masks.Segments(q_ids % 2, kv_ids % 2),
    }


@pytest.mark.parametrize("mask_name", list(_mask_cases(2, 4, 3, 3)))
@pytest.mark.parametrize("q_len,kv_len", [(50, 50), (37, 90), (300, 257)])
def test_masks(case, mask_name, q_len, kv_len):
    q, k, v = random_qkv(5, 2, q_len, kv_len, 4, 2, 64, case.dtype)
    check_forward(case, q, k, v, mask=_mask_cases(2, 4, q_len, kv_len)[mask_name])


def test_causal_flag_with_mask_is_intersection(case):
    q, k, v = random_qkv(6, 1, 40, 40, 2, 2, 64, case.dtype)
    window = masks.SlidingWindow(None, 10)
    ours = attend(case, q, k, v, mask=window, causal=True)
    both, _ = oracle.attention(q, k, v, mask=window & masks.Causal())
    assert_close(ours, both, case.dtype)


def test_fully_masked_rows_are_zero_not_nan(case):
    q, k, v = random_qkv(7, 2, 20, 30, 2, 2, 64, case.dtype)
    dense = np.ones((2, 1, 20, 30), bool)
    dense[0, 0, 3] = False   # one row sees nothing
    dense[1, 0, :] = False   # a whole batch row sees nothing
    out, lse = check_forward(case, q, k, v, mask=masks.Dense(jnp.asarray(dense)))
    out = np.asarray(out, np.float32)
    assert np.all(out[0, 3] == 0) and np.all(out[1] == 0)
    assert np.all(np.asarray(lse)[0, :, 3] == -np.inf)
    grads = jax.grad(lambda q, k, v: jnp.sum(attend(
        case, q, k, v, mask=masks.Dense(jnp.asarray(dense))).astype(jnp.float32) ** 2), (0, 1, 2))(q, k, v)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g, np.float32)))
    assert np.all(np.asarray(grads[0], np.float32)[1] == 0)
    # Top-left causal with Sq > Skv leaves no row empty; bottom-right does.
    q2, k2, v2 = random_qkv(8, 1, 12, 5, 2, 2, 64, case.dtype)
    out2, _ = check_forward(case, q2, k2, v2, causal=True)
    assert np.all(np.asarray(out2, np.float32)[:, :7] == 0)


@pytest.mark.parametrize("bias_shape", [(2, 4, 33, 47), (1, 4, 33, 47), (2, 1, 33, 47), (1, 1, 33, 47)])
def test_bias(case, bias_shape):
    q, k, v = random_qkv(9, 2, 33, 47, 4, 2, 64, case.dtype)
    bias = jax.random.normal(jax.random.PRNGKey(10), bias_shape)
    check_forward(case, q, k, v, bias=bias)
    check_forward(case, q, k, v, bias=bias, causal=True)


def test_alibi_style_bias_low_precision(case):
    dtype = jnp.float16 if case.backend == "volta" else jnp.bfloat16
    q, k, v = random_qkv(11, 1, 40, 40, 4, 4, 64, dtype)
    slopes = 2.0 ** -jnp.arange(1, 5)
    distance = jnp.arange(40)[None, :] - jnp.arange(40)[:, None]
    bias = (slopes[:, None, None] * distance[None]).astype(dtype)[None]
    check_forward(case, q, k, v, bias=bias, causal=True)


@pytest.mark.parametrize("softmax_scale", [0.3, -0.2, 0.0])
def test_softmax_scale_of_any_sign(case, softmax_scale):
    """Kernels that fold the scale into exp2 hold for scale > 0 only; zero and
    negative scales must take kernels right for them (the lse of scale 0 is
    the log of the visible count)."""
    q, k, v = random_qkv(12, 2, 70, 57, 4, 2, 64, case.dtype)
    check_forward(case, q, k, v, softmax_scale=softmax_scale)
    check_forward(case, q, k, v, causal=True, softmax_scale=softmax_scale)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_every_dtype(case, dtype):
    q, k, v = random_qkv(13, 2, 37, 45, 4, 2, 64, dtype)
    check_gradients(case, q, k, v)
    check_gradients(case, q, k, v, causal=True)


@pytest.mark.parametrize("head_dim", [40, 128, 200])
def test_gradients_head_dims(case, head_dim):
    q, k, v = random_qkv(24, 1, 70, 90, 4, 2, head_dim, case.dtype)
    check_gradients(case, q, k, v, causal=True)


@pytest.mark.parametrize("mask_name", ["causal", "causal_top_left", "window", "diagonal", "segments", "dense",
                                       "causal&segments"])
def test_gradients_masks(case, mask_name):
    q, k, v = random_qkv(14, 2, 41, 53, 4, 1, 64, case.dtype)
    check_gradients(case, q, k, v, mask=_mask_cases(2, 4, 41, 53)[mask_name])


@pytest.mark.parametrize("bias_shape", [(2, 4, 29, 35), (1, 1, 29, 35), (2, 1, 29, 35)])
def test_gradients_bias(case, bias_shape):
    q, k, v = random_qkv(15, 2, 29, 35, 4, 2, 64, case.dtype)
    bias = jax.random.normal(jax.random.PRNGKey(16), bias_shape)
    check_gradients(case, q, k, v, bias=bias, causal=True)


def test_jit_and_checkpoint(case):
    q, k, v = random_qkv(17, 2, 30, 30, 2, 2, 64, case.dtype)
    fn = jax.jit(lambda q, k, v: attend(case, q, k, v, causal=True))
    eager = attend(case, q, k, v, causal=True)
    assert_close(fn(q, k, v), oracle.attention(q, k, v, causal=True)[0], case.dtype)
    np.testing.assert_array_equal(np.asarray(fn(q, k, v), np.float32), np.asarray(eager, np.float32))
    loss = lambda q, k, v: jnp.sum(jax.checkpoint(
        lambda q, k, v: attend(case, q, k, v, causal=True))(q, k, v).astype(jnp.float32) ** 2)
    ref_loss = lambda q, k, v: jnp.sum(oracle.attention(q, k, v, causal=True)[0] ** 2)
    up = lambda x: x.astype(jnp.float32)
    tol = GRAD_TOLERANCE[jnp.dtype(case.dtype).name]
    for g, r in zip(jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v), jax.grad(ref_loss, (0, 1, 2))(up(q), up(k), up(v))):
        assert_close(g, r, case.dtype, tolerance=tol)


def test_traced_segment_ids_under_jit(case):
    q, k, v = random_qkv(18, 2, 40, 40, 2, 2, 64, case.dtype)
    q_ids, kv_ids = _segments(19, 2, 40, 40)

    @jax.jit
    def fn(q, k, v, q_ids, kv_ids):
        return attend(case, q, k, v, mask=masks.Segments(q_ids, kv_ids))

    expected, _ = oracle.attention(q, k, v, mask=masks.Segments(q_ids, kv_ids))
    assert_close(fn(q, k, v, q_ids, kv_ids), expected, case.dtype)


@pytest.mark.parametrize("in_axes", [(0, 0, 0), (0, None, None), (None, 0, 0)])
def test_vmap(case, in_axes):
    """vmap over an extra leading axis (size 3), batch 2 inside."""
    q, k, v = random_qkv(20, 6, 21, 34, 4, 2, 64, case.dtype)
    shaped = lambda x, ax: x.reshape(3, 2, *x.shape[1:]) if ax == 0 else x[:2]
    qs, ks, vs = (shaped(x, ax) for x, ax in zip((q, k, v), in_axes))
    out = jax.vmap(lambda q, k, v: attend(case, q, k, v, causal=True), in_axes=in_axes)(qs, ks, vs)
    expected = jax.vmap(lambda q, k, v: oracle.attention(q, k, v, causal=True)[0], in_axes=in_axes)(qs, ks, vs)
    assert_close(out, expected, case.dtype)


def test_vmap_with_batched_segments_and_grad(case):
    q, k, v = random_qkv(21, 6, 24, 24, 2, 2, 64, case.dtype)
    q_ids, kv_ids = _segments(22, 6, 24, 24)
    split = lambda x: x.reshape(3, 2, *x.shape[1:])

    def loss(fn, q, k, v, q_ids, kv_ids):
        return jnp.sum(fn(q, k, v, masks.Segments(q_ids, kv_ids)).astype(jnp.float32) ** 2)

    ours = jax.vmap(jax.grad(lambda *a: loss(lambda q, k, v, m: attend(case, q, k, v, mask=m), *a), (0, 1, 2)))
    args = [split(x) for x in (q, k, v, q_ids, kv_ids)]
    got = jax.jit(ours)(*args)
    # The oracle builds its mask in numpy: one example at a time, ids concrete.
    oracle_loss = lambda ids: lambda q, k, v: loss(lambda q, k, v, m: oracle.attention(q, k, v, mask=m)[0],
                                                   q, k, v, *ids)
    tol = GRAD_TOLERANCE[jnp.dtype(case.dtype).name]
    for i in range(3):
        ids = (args[3][i], args[4][i])
        expected = jax.grad(oracle_loss(ids), (0, 1, 2))(*(x[i].astype(jnp.float32) for x in args[:3]))
        for g, r in zip(got, expected):
            assert_close(g[i], r, case.dtype, tolerance=tol)


@pytest.mark.parametrize("mesh_shape", [(2, 4), (4, 2)])
def test_sharded_batch_and_heads(case, mesh_shape):
    """Under a (data, model) mesh over 8 devices of the case's platform the
    sharded forward and gradients equal the unsharded ones. Needs >= 2
    devices: a mesh of one device would compare a call with itself."""
    platform = "gpu" if case.gpu else "cpu"
    devices = jax.devices(platform)
    if len(devices) < 2:
        pytest.skip(f"needs >= 2 {platform} devices, this machine has {len(devices)}")
    rows = min(mesh_shape[0], len(devices))
    cols = max(1, min(mesh_shape[1], len(devices) // rows))
    mesh = Mesh(np.array(devices[:rows * cols]).reshape(rows, cols), ("data", "model"))
    q, k, v = random_qkv(25, 2 * rows, 70, 70, 2 * cols, cols, 64, case.dtype)
    spec = NamedSharding(mesh, P("data", None, "model", None))
    placed = [jax.device_put(x, spec) for x in (q, k, v)]
    fn = lambda q, k, v: attend(case, q, k, v, causal=True)
    grad = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) ** 2), (0, 1, 2))
    sharded_out = jax.jit(fn)(*placed)
    assert tuple(sharded_out.sharding.spec)[:3] == ("data", None, "model")
    tol = TOLERANCE[jnp.dtype(case.dtype).name]
    assert_close(sharded_out, fn(q, k, v), case.dtype, tolerance=tol / 10)
    for g, r in zip(jax.jit(grad)(*placed), grad(q, k, v)):
        assert_close(g, r, case.dtype, tolerance=tol / 10)


def test_backward_given_the_merged_lse(case):
    """flash_attention_backward over each part of the keys, given the out and
    lse of attention over all of them (as ring attention has), sums to the
    gradients of the whole (causal, bottom-right: part [lo, hi) of Skv keys
    sees keys up to i + Skv - Sq, a window with right = Skv - hi)."""
    q, k, v = random_qkv(26, 2, 37, 50, 4, 2, 64, case.dtype)
    if not case.supports(q.dtype, 64):
        return expect_unsupported(case, q, k, v)
    d_out = jax.random.normal(jax.random.PRNGKey(27), q.shape).astype(q.dtype)
    out, lse = attend(case, q, k, v, causal=True, return_lse=True)
    d_q = 0.0
    d_k, d_v = [], []
    for lo, hi in ((0, 20), (20, 50)):
        grads = flash_attention_backward(q, k[:, lo:hi], v[:, lo:hi], out, lse, d_out, backend=case.backend,
                                         config=case.config, mask=masks.SlidingWindow(None, 50 - hi))
        d_q = d_q + grads[0].astype(jnp.float32)
        d_k.append(grads[1])
        d_v.append(grads[2])
    up = lambda x: x.astype(jnp.float32)
    _, vjp = jax.vjp(lambda q, k, v: oracle.attention(q, k, v, causal=True)[0], up(q), up(k), up(v))
    tol = GRAD_TOLERANCE[jnp.dtype(case.dtype).name]
    for name, got, ref in zip(("d_q", "d_k", "d_v"), (d_q, jnp.concatenate(d_k, 1), jnp.concatenate(d_v, 1)),
                              vjp(up(d_out))):
        assert_close(got, ref, case.dtype, tolerance=tol, what=name)
