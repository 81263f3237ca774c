"""The CUDA backward kernels (dQ, dK, dV, dBias) against the reference's
gradients on the GPU at hand (pytest -m gpu tests/test_gpu_backward.py):
odd shapes, padded head dims, GQA/MQA, every mask kind, fully masked rows,
bias, jit/vmap, sharding, and bitwise reproducibility."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_fastattn import ffi, flash_attention, masks
from helpers import random_qkv
from test_attention import check_gradients

pytestmark = pytest.mark.gpu


@pytest.fixture(params=[jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
def dtype(request):
    if not (ffi.gpu_available() and "fastattn_backward_cuda" in ffi.cuda_targets()):
        pytest.skip("needs a GPU and the CUDA backward kernel")
    return request.param


@pytest.mark.parametrize("q_len,kv_len", [(1, 1), (7, 7), (63, 129), (129, 63), (300, 257)])
@pytest.mark.parametrize("head_dim", [64, 128, 40, 96])
def test_shapes(dtype, q_len, kv_len, head_dim):
    q, k, v = random_qkv(10, 2, q_len, kv_len, 4, 2, head_dim, dtype)
    check_gradients("cuda", q, k, v)
    check_gradients("cuda", q, k, v, causal=True)


@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
def test_head_groups(dtype, heads):
    q, k, v = random_qkv(11, 2, 200, 260, heads[0], heads[1], 128, dtype)
    check_gradients("cuda", q, k, v, causal=True)


@pytest.mark.parametrize("mask", [
    masks.Causal(align="top_left"), masks.SlidingWindow(50, 10), masks.SlidingWindow(17, None),
    masks.SlidingWindow(0, 0)], ids=["causal-top-left", "window-50-10", "window-17-open", "diagonal"])
def test_band_masks(dtype, mask):
    q, k, v = random_qkv(12, 1, 333, 333, 4, 4, 64, dtype)
    check_gradients("cuda", q, k, v, mask=mask)


def test_segments_dense_bias_and_fully_masked_rows(dtype):
    batch, q_len, kv_len = 2, 190, 210
    q, k, v = random_qkv(13, batch, q_len, kv_len, 4, 4, 64, dtype)
    q_ids = jnp.asarray(np.repeat(np.arange(5), 38)[None].repeat(batch, 0), jnp.int32)
    kv_ids = jnp.asarray(np.repeat(np.arange(6), 35)[None].repeat(batch, 0), jnp.int32)
    q_ids = q_ids.at[:, :10].set(-1)  # padding queries see nothing: zero gradients, no NaN
    check_gradients("cuda", q, k, v, mask=masks.Segments(q_ids, kv_ids))
    dense = jax.random.bernoulli(jax.random.PRNGKey(4), 0.3, (1, 4, q_len, kv_len))
    check_gradients("cuda", q, k, v, mask=masks.Dense(dense) & masks.Causal())
    bias = jax.random.normal(jax.random.PRNGKey(5), (batch, 1, q_len, kv_len), jnp.float32)
    check_gradients("cuda", q, k, v, bias=bias, causal=True)
    bias = jax.random.normal(jax.random.PRNGKey(6), (1, 4, q_len, kv_len), jnp.float32)
    check_gradients("cuda", q, k, v, bias=bias, mask=masks.Segments(q_ids, kv_ids))


@pytest.mark.parametrize("mask", [None, masks.Causal(), masks.SlidingWindow(200, 30)],
                         ids=["full", "causal", "window"])
def test_long_sequences_gqa(dtype, mask):
    """Many q tiles per key block and many key tiles per query block: the
    sm90a kernels' stage rings wrap several times, and items of other heads of
    the GQA group follow each other."""
    for head_dim in (64, 128):
        q, k, v = random_qkv(16, 1, 1100, 1030, 8, 2, head_dim, dtype)
        check_gradients("cuda", q, k, v, mask=mask)


@pytest.mark.parametrize("mask", [None, masks.Causal(), masks.SlidingWindow(50, 10)],
                         ids=["full", "causal", "window"])
def test_mma_sync_backward_where_wgmma_runs(dtype, monkeypatch, mask):
    """On sm_90 the dK/dV and dQ passes take the wgmma kernels for D 64/128;
    the mma.sync ones (what sm80/sm89 run) must stay right there too.
    FASTATTN_CUDA_BACKWARD=mma_sync is read by the handler at every call."""
    monkeypatch.setenv("FASTATTN_CUDA_BACKWARD", "mma_sync")
    for head_dim in (64, 128):
        q, k, v = random_qkv(17, 2, 300, 257, 4, 2, head_dim, dtype)
        check_gradients("cuda", q, k, v, mask=mask)


@pytest.mark.parametrize("mask", [None, masks.Causal(), masks.SlidingWindow(100, 0)],
                         ids=["full", "causal", "window"])
def test_wgmma_backward_matches_mma_sync(dtype, monkeypatch, mask):
    """Where the wgmma backward runs (sm_90), it sums every gradient element
    in the same order as the mma.sync kernels (q tiles, then 16-wide k steps),
    so the two agree bit for bit; a wrong lse, delta or mask column would not.
    Elsewhere both runs take the mma.sync kernels and agree trivially."""
    q, k, v = random_qkv(18, 2, 700, 650, 8, 2, 128, dtype)
    wgmma = _grads(q, k, v, mask=mask)
    monkeypatch.setenv("FASTATTN_CUDA_BACKWARD", "mma_sync")
    mma_sync = _grads(q, k, v, mask=mask)
    for a, b in zip(wgmma, mma_sync):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def _grads(q, k, v, **kwargs):
    def loss(q, k, v):
        return jnp.sum(flash_attention(q, k, v, backend="cuda", **kwargs).astype(jnp.float32) ** 2)
    return jax.grad(loss, (0, 1, 2))(q, k, v)


def test_bitwise_reproducible_jit_and_vmap(dtype):
    q, k, v = random_qkv(14, 2, 520, 520, 8, 2, 128, dtype)
    grad = jax.jit(lambda q, k, v: _grads(q, k, v, causal=True))
    first, second = grad(q, k, v), grad(q, k, v)
    for a, b in zip(first, second):  # no atomics: the same bits every run
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    eager = _grads(q, k, v, causal=True)
    for a, b in zip(first, eager):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    stacked = [jnp.stack([x, x * 0.5]) for x in (q, k, v)]
    batched = jax.vmap(lambda q, k, v: _grads(q, k, v, causal=True))(*stacked)
    for a, b in zip(batched, first):
        np.testing.assert_array_equal(np.asarray(a[0], np.float32), np.asarray(b, np.float32))


def test_sharded_gradients(dtype):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    devices = np.array(jax.devices("gpu"))
    mesh = Mesh(devices.reshape(len(devices), 1), ("data", "model"))
    q, k, v = random_qkv(15, 2 * len(devices), 130, 130, 4, 2, 64, dtype)
    spec = NamedSharding(mesh, P("data", None, "model", None))
    placed = [jax.device_put(x, spec) for x in (q, k, v)]
    sharded = jax.jit(lambda q, k, v: _grads(q, k, v, causal=True))(*placed)
    for a, b in zip(sharded, _grads(q, k, v, causal=True)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
