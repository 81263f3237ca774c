"""The Volta kernel (mma.m8n8k4, compute_70 PTX run by the driver JIT) against
the reference, on the GPU at hand: pytest -m gpu tests/test_gpu_volta.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_fastattn import ffi, flash_attention, masks
from helpers import random_qkv
from test_attention import check_forward, check_gradients

pytestmark = pytest.mark.gpu


def _has_volta_kernel():
    return ffi.gpu_available() and "fastattn_forward_volta" in ffi.cuda_targets()


requires_volta = pytest.mark.skipif(not _has_volta_kernel(), reason="needs a GPU and the Volta kernel")
F16 = jnp.float16


@requires_volta
@pytest.mark.parametrize("q_len,kv_len", [(1, 1), (7, 7), (63, 129), (129, 63), (300, 257), (128, 32)])
@pytest.mark.parametrize("head_dim", [64, 128, 40, 96, 8])
def test_shapes(q_len, kv_len, head_dim):
    q, k, v = random_qkv(0, 2, q_len, kv_len, 4, 2, head_dim, F16)
    check_forward("volta", q, k, v)
    check_forward("volta", q, k, v, causal=True)


@requires_volta
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
def test_head_groups(heads):
    q, k, v = random_qkv(1, 3, 200, 333, heads[0], heads[1], 64, F16)
    check_forward("volta", q, k, v)


@requires_volta
@pytest.mark.parametrize("mask", [
    masks.Causal(align="top_left"),
    masks.SlidingWindow(50, 10),
    masks.SlidingWindow(None, 0, align="top_left"),
    masks.SlidingWindow(0, 0),
], ids=["causal-top-left", "window-50-10", "window-causal", "diagonal"])
def test_band_masks(mask):
    q, k, v = random_qkv(2, 2, 259, 301, 4, 2, 128, F16)
    check_forward("volta", q, k, v, mask=mask)


@requires_volta
def test_segments_dense_bias_and_fully_masked_rows():
    batch, q_len, kv_len = 2, 190, 210
    q, k, v = random_qkv(3, batch, q_len, kv_len, 4, 4, 64, F16)
    q_ids = jnp.asarray(np.repeat(np.arange(5), 38)[None].repeat(batch, 0), jnp.int32)
    kv_ids = jnp.asarray(np.repeat(np.arange(6), 35)[None].repeat(batch, 0), jnp.int32)
    q_ids = q_ids.at[:, :10].set(-1)  # padding queries: see nothing
    out, lse = check_forward("volta", q, k, v, mask=masks.Segments(q_ids, kv_ids))
    assert np.all(np.asarray(out, np.float32)[:, :10] == 0)
    assert np.all(np.isneginf(np.asarray(lse)[:, :, :10]))
    dense = jax.random.bernoulli(jax.random.PRNGKey(4), 0.3, (1, 4, q_len, kv_len))
    check_forward("volta", q, k, v, mask=masks.Dense(dense) & masks.Causal())
    bias = jax.random.normal(jax.random.PRNGKey(5), (batch, 1, q_len, kv_len), jnp.float32)
    check_forward("volta", q, k, v, bias=bias, causal=True)


@requires_volta
def test_gradients_jit_and_vmap():
    q, k, v = random_qkv(6, 2, 150, 170, 4, 2, 64, F16)
    check_gradients("volta", q, k, v, causal=True)
    fn = jax.jit(lambda q, k, v: flash_attention(q, k, v, causal=True, backend="volta"))
    ref = flash_attention(q, k, v, causal=True, backend="volta")
    np.testing.assert_array_equal(np.asarray(fn(q, k, v), np.float32), np.asarray(ref, np.float32))
    stacked = [jnp.stack([x, x * 0.5]) for x in (q, k, v)]
    batched = jax.vmap(lambda q, k, v: flash_attention(q, k, v, causal=True, backend="volta"))(*stacked)
    np.testing.assert_array_equal(np.asarray(batched[0], np.float32), np.asarray(ref, np.float32))


@requires_volta
def test_sharded_over_the_device_mesh():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    devices = np.array(jax.devices("gpu"))
    mesh = Mesh(devices.reshape(len(devices), 1), ("data", "model"))
    q, k, v = random_qkv(7, 2 * len(devices), 130, 130, 4, 2, 64, F16)
    spec = NamedSharding(mesh, P("data", None, "model", None))
    placed = [jax.device_put(x, spec) for x in (q, k, v)]
    out = jax.jit(lambda q, k, v: flash_attention(q, k, v, causal=True, backend="volta"))(*placed)
    ref = flash_attention(q, k, v, causal=True, backend="volta")
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))


@requires_volta
def test_rejects_what_it_cannot_run():
    q, k, v = random_qkv(8, 1, 16, 16, 2, 2, 64, jnp.bfloat16)
    with pytest.raises(TypeError, match="backend='volta' takes float16"):
        flash_attention(q, k, v, backend="volta")
    q, k, v = random_qkv(8, 1, 16, 16, 2, 2, 256, F16)
    with pytest.raises(ValueError, match="head dim D <= 128"):
        flash_attention(q, k, v, backend="volta")
