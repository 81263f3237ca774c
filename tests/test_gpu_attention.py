"""The GPU attention kernels against the reference, on the GPU at hand
(pytest -m gpu tests/test_gpu_attention.py): "cuda" (on sm_90 the wgmma
kernel for D 64/128, else sm80+ mma.m16n8k16; bfloat16 and float16) and
"volta" (mma.m8n8k4 as compute_70 PTX run by the driver JIT, float16)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_fastattn import ffi, flash_attention, masks
from helpers import random_qkv
from test_attention import check_forward, check_gradients

pytestmark = pytest.mark.gpu


KERNELS = {"cuda": "fastattn_forward_cuda", "volta": "fastattn_forward_volta"}
CASES = [("cuda", jnp.bfloat16), ("cuda", jnp.float16), ("volta", jnp.float16)]


@pytest.fixture(params=CASES, ids=["cuda-bf16", "cuda-f16", "volta-f16"])
def kernel(request):
    backend, dtype = request.param
    if not (ffi.gpu_available() and KERNELS[backend] in ffi.cuda_targets()):
        pytest.skip(f"needs a GPU and the {backend} kernel")
    return backend, dtype


@pytest.mark.parametrize("q_len,kv_len", [(1, 1), (7, 7), (63, 129), (129, 63), (300, 257), (128, 32)])
@pytest.mark.parametrize("head_dim", [64, 128, 40, 96, 8, 256, 200])
def test_shapes(kernel, q_len, kv_len, head_dim):
    backend, dtype = kernel
    q, k, v = random_qkv(0, 2, q_len, kv_len, 4, 2, head_dim, dtype)
    check_forward(backend, q, k, v)
    check_forward(backend, q, k, v, causal=True)


def take_mma_sync_forward(backend, monkeypatch):
    """The cuda backend's mma.sync forward (what sm80/sm89 run) even on
    sm_90: FASTATTN_CUDA_FORWARD=mma_sync, read by the handler at every
    call."""
    if backend != "cuda":
        pytest.skip("a cuda-backend switch")
    monkeypatch.setenv("FASTATTN_CUDA_FORWARD", "mma_sync")


@pytest.mark.parametrize("mask", [None, masks.Causal(), masks.SlidingWindow(50, 10)],
                         ids=["full", "causal", "window"])
def test_mma_sync_forward_where_wgmma_runs(kernel, monkeypatch, mask):
    """On sm_90 the cuda backend takes the wgmma kernel for D 64/128; the
    mma.sync kernel (what sm80/sm89 run) must stay right there too."""
    backend, dtype = kernel
    take_mma_sync_forward(backend, monkeypatch)
    for head_dim in (64, 128):
        q, k, v = random_qkv(10, 2, 300, 257, 4, 2, head_dim, dtype)
        check_forward(backend, q, k, v, mask=mask)


@pytest.mark.parametrize("forward", ["auto", "mma_sync"])
@pytest.mark.parametrize("softmax_scale", [0.3, -0.2, 0.0])
def test_softmax_scale_of_any_sign(kernel, monkeypatch, forward, softmax_scale):
    """The band-only kernels fold the scale into their exp2s, which holds
    for scale > 0 only; zero and negative scales must take kernels that are
    right for them (the lse of scale 0 is log of the visible count)."""
    backend, dtype = kernel
    if forward == "mma_sync":
        take_mma_sync_forward(backend, monkeypatch)
    for head_dim in (64, 128):
        q, k, v = random_qkv(11, 2, 300, 257, 4, 2, head_dim, dtype)
        check_forward(backend, q, k, v, softmax_scale=softmax_scale)
        check_forward(backend, q, k, v, mask=masks.Causal(), softmax_scale=softmax_scale)
    if backend == "cuda" and forward == "auto":
        check_gradients(backend, q, k, v, mask=masks.Causal(), softmax_scale=softmax_scale)


@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
def test_head_groups(kernel, heads):
    backend, dtype = kernel
    q, k, v = random_qkv(1, 3, 200, 333, heads[0], heads[1], 64, dtype)
    check_forward(backend, q, k, v)


@pytest.mark.parametrize("mask", [
    masks.Causal(align="top_left"),
    masks.SlidingWindow(50, 10),
    masks.SlidingWindow(None, 0, align="top_left"),
    masks.SlidingWindow(0, 0),
], ids=["causal-top-left", "window-50-10", "window-causal", "diagonal"])
def test_band_masks(kernel, mask):
    backend, dtype = kernel
    q, k, v = random_qkv(2, 2, 259, 301, 4, 2, 128, dtype)
    check_forward(backend, q, k, v, mask=mask)


def test_segments_dense_bias_and_fully_masked_rows(kernel):
    backend, dtype = kernel
    batch, q_len, kv_len = 2, 190, 210
    q, k, v = random_qkv(3, batch, q_len, kv_len, 4, 4, 64, dtype)
    q_ids = jnp.asarray(np.repeat(np.arange(5), 38)[None].repeat(batch, 0), jnp.int32)
    kv_ids = jnp.asarray(np.repeat(np.arange(6), 35)[None].repeat(batch, 0), jnp.int32)
    q_ids = q_ids.at[:, :10].set(-1)  # padding queries: see nothing
    out, lse = check_forward(backend, q, k, v, mask=masks.Segments(q_ids, kv_ids))
    assert np.all(np.asarray(out, np.float32)[:, :10] == 0)
    assert np.all(np.isneginf(np.asarray(lse)[:, :, :10]))
    dense = jax.random.bernoulli(jax.random.PRNGKey(4), 0.3, (1, 4, q_len, kv_len))
    check_forward(backend, q, k, v, mask=masks.Dense(dense) & masks.Causal())
    bias = jax.random.normal(jax.random.PRNGKey(5), (batch, 1, q_len, kv_len), jnp.float32)
    check_forward(backend, q, k, v, bias=bias, causal=True)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_many_work_items_per_cta(kernel, head_dim):
    """Enough 128-row query blocks (18 x 32 = 576) that the persistent sm90a
    forward gives each CTA several items: its stage ring and Q buffer run
    on across items, with no mask, under the band-only and the general
    mask, with whole query blocks that see nothing (no K/V step at all)
    between others."""
    backend, dtype = kernel
    if backend != "cuda":
        pytest.skip("the persistent kernel is the cuda backend's")
    batch, length = 2, 2304
    q, k, v = random_qkv(11, batch, length, length, 16, 4, head_dim, dtype)
    check_forward(backend, q, k, v, causal=True)
    # No mask: 176-key steps at D=128 (2304 = 13 x 176 + 16, a short last one).
    check_forward(backend, q, k, v)
    ids = np.repeat(np.arange(length // 256), 256)[None].repeat(batch, 0)
    q_ids = jnp.asarray(ids, jnp.int32).at[0, 128:384].set(-1)  # two blocks see nothing
    out, lse = check_forward(backend, q, k, v, mask=masks.Segments(q_ids, jnp.asarray(ids, jnp.int32)))
    assert np.all(np.asarray(out, np.float32)[0, 128:384] == 0)
    assert np.all(np.isneginf(np.asarray(lse)[0, :, 128:384]))
    bias = jax.random.normal(jax.random.PRNGKey(12), (batch, 1, length, length), jnp.float32)
    check_forward(backend, q, k, v, bias=bias, causal=True)


def test_gradients_jit_and_vmap(kernel):
    backend, dtype = kernel
    q, k, v = random_qkv(6, 2, 150, 170, 4, 2, 64, dtype)
    check_gradients(backend, q, k, v, causal=True)
    fn = jax.jit(lambda q, k, v: flash_attention(q, k, v, causal=True, backend=backend))
    ref = flash_attention(q, k, v, causal=True, backend=backend)
    np.testing.assert_array_equal(np.asarray(fn(q, k, v), np.float32), np.asarray(ref, np.float32))
    stacked = [jnp.stack([x, x * 0.5]) for x in (q, k, v)]
    batched = jax.vmap(lambda q, k, v: flash_attention(q, k, v, causal=True, backend=backend))(*stacked)
    np.testing.assert_array_equal(np.asarray(batched[0], np.float32), np.asarray(ref, np.float32))


def test_sharded_over_the_device_mesh(kernel):
    backend, dtype = kernel
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    devices = np.array(jax.devices("gpu"))
    mesh = Mesh(devices.reshape(len(devices), 1), ("data", "model"))
    q, k, v = random_qkv(7, 2 * len(devices), 130, 130, 4, 2, 64, dtype)
    spec = NamedSharding(mesh, P("data", None, "model", None))
    placed = [jax.device_put(x, spec) for x in (q, k, v)]
    out = jax.jit(lambda q, k, v: flash_attention(q, k, v, causal=True, backend=backend))(*placed)
    ref = flash_attention(q, k, v, causal=True, backend=backend)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))


def test_rejects_what_it_cannot_run(kernel):
    backend, dtype = kernel
    wrong = jnp.float32 if backend == "cuda" else jnp.bfloat16
    q, k, v = random_qkv(8, 1, 16, 16, 2, 2, 64, wrong)
    with pytest.raises(TypeError, match=f"backend='{backend}' takes"):
        flash_attention(q, k, v, backend=backend)
    q, k, v = random_qkv(8, 1, 16, 16, 2, 2, 256, dtype)
    if backend == "volta":
        with pytest.raises(ValueError, match="head dim D <= 128"):
            flash_attention(q, k, v, backend=backend)
    # auto takes the documented pure-JAX path for what the kernels do not cover
    out = flash_attention(q, k, v)
    assert out.shape == q.shape


def test_head_dim_256_gradients(kernel):
    """D in (128, 256]: the cuda forward kernel (Q from shared memory, 32-key
    slices) with the blockwise JAX backward on its lse."""
    backend, dtype = kernel
    if backend != "cuda":
        pytest.skip("the Volta kernel stops at D = 128")
    q, k, v = random_qkv(9, 2, 150, 170, 4, 2, 256, dtype)
    check_gradients(backend, q, k, v, causal=True)
    q, k, v = random_qkv(9, 1, 70, 90, 2, 2, 200, dtype)
    check_gradients(backend, q, k, v)
