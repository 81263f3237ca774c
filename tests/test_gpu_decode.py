"""CUDA decode kernel against the reference (run on a GPU: pytest -m gpu)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_fastattn import decode_attention, ffi
from jax_fastattn.config import KernelConfig
from helpers import assert_close
from test_decode import _paged, assert_lse_close, garbage_past_length, reference_decode

pytestmark = pytest.mark.gpu


requires_gpu = pytest.mark.skipif(not ffi.gpu_available(), reason="needs a CUDA GPU")


def _inputs(seed, batch, s_max, heads, kv_heads, d, dtype):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(keys[0], (batch, heads, d)).astype(dtype)
    k = jax.random.normal(keys[1], (batch, s_max, kv_heads, d)).astype(dtype)
    v = jax.random.normal(keys[2], (batch, s_max, kv_heads, d)).astype(dtype)
    return q, k, v


@requires_gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("heads", [(32, 8), (8, 1), (4, 4), (12, 4)], ids=["gqa-32/8", "mqa", "mha", "group-3"])
@pytest.mark.parametrize("d", [64, 128, 256, 80])
def test_cuda_decode_matches_reference(dtype, heads, d):
    batch, s_max = 5, 777
    q, k, v = _inputs(0, batch, s_max, heads[0], heads[1], d, dtype)
    lengths = jnp.array([1, s_max, 0, 300, 511], jnp.int32)
    k_dirty, v_dirty = garbage_past_length(k, v, lengths)
    out = jax.jit(lambda *a: decode_attention(*a, backend="cuda"))(q, k_dirty, v_dirty, lengths)
    assert out.dtype == q.dtype
    assert_close(out, reference_decode(q, k, v, lengths), dtype)
    assert np.all(np.asarray(out, np.float32)[2] == 0)


@requires_gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("heads", [(32, 8), (8, 1), (4, 4), (12, 4), (16, 1)],
                         ids=["gqa-32/8", "mqa-8", "mha", "group-3", "group-16"])
@pytest.mark.parametrize("d", [64, 128])
def test_cuda_decode_mma_sync_matches_reference(dtype, heads, d):
    """The tensor-core kernel: ragged lengths (0, 1, a partial last tile,
    the whole cache), garbage past each length, lse."""
    batch, s_max = 5, 1000
    q, k, v = _inputs(4, batch, s_max, heads[0], heads[1], d, dtype)
    lengths = jnp.array([1, s_max, 0, 300, 513], jnp.int32)
    k_dirty, v_dirty = garbage_past_length(k, v, lengths)
    mma = KernelConfig(cuda_decode="mma_sync")
    out, lse = jax.jit(lambda *a: decode_attention(*a, backend="cuda", config=mma, return_lse=True))(
        q, k_dirty, v_dirty, lengths)
    expected_out, expected_lse = reference_decode(q, k, v, lengths, return_lse=True)
    assert out.dtype == q.dtype
    assert_close(out, expected_out, dtype)
    assert_lse_close(lse, expected_lse, dtype)
    assert np.all(np.asarray(out, np.float32)[2] == 0)


@requires_gpu
@pytest.mark.parametrize("s_max", [64, 70000], ids=["one-tile", "many-splits"])
def test_cuda_decode_mma_sync_equals_simt(s_max):
    q, k, v = _inputs(5, 3, s_max, 32, 8, 128, jnp.bfloat16)
    lengths = jnp.array([s_max, s_max // 2 + 1, 17], jnp.int32)
    run = lambda kernel: jax.jit(lambda *a: decode_attention(*a, backend="cuda", return_lse=True,  # noqa: E731
                                                             config=KernelConfig(cuda_decode=kernel)))(q, k, v, lengths)
    (mma_out, mma_lse), (simt_out, simt_lse) = run("mma_sync"), run("simt")
    assert_close(mma_out, simt_out, jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(mma_lse), np.asarray(simt_lse), rtol=1e-2, atol=1e-2)


@requires_gpu
@pytest.mark.parametrize("dtype,head_dim,expected", [(jnp.bfloat16, 128, "mma_sync"), (jnp.float16, 64, "mma_sync"),
                                                      (jnp.float32, 128, "simt"), (jnp.bfloat16, 96, "simt")])
def test_cuda_decode_auto_takes_mma_sync_where_it_can(dtype, head_dim, expected):
    q, k, v = _inputs(11, 2, 3000, 16, 4, head_dim, dtype)
    lengths = jnp.array([3000, 1234], jnp.int32)
    run = lambda kernel: np.asarray(jax.jit(lambda *a: decode_attention(  # noqa: E731
        *a, backend="cuda", config=KernelConfig(cuda_decode=kernel)))(q, k, v, lengths), np.float32)
    chosen = run("auto")
    np.testing.assert_array_equal(chosen, run(expected))  # the same kernel: bit for bit
    if expected == "mma_sync":
        assert not np.array_equal(chosen, run("simt")), "simt and mma_sync round differently; auto ran simt"


@requires_gpu
@pytest.mark.parametrize("page_size", [16, 24, 256])  # 24: a 64-key tile spans pages at odd offsets
def test_cuda_decode_mma_sync_paged(page_size):
    q, k, v = _inputs(7, 4, 1000, 32, 8, 128, jnp.bfloat16)
    lengths = jnp.array([1, 1000, 255, 513], jnp.int32)
    k_pages, v_pages, table = _paged(k, v, page_size, seed=page_size)
    mma = KernelConfig(cuda_decode="mma_sync")
    out, lse = jax.jit(lambda *a: decode_attention(*a[:4], page_table=a[4], backend="cuda", config=mma,
                                                   return_lse=True))(q, k_pages, v_pages, lengths, table)
    expected_out, expected_lse = reference_decode(q, k, v, lengths, return_lse=True)
    assert_close(out, expected_out, jnp.bfloat16)
    assert_lse_close(lse, expected_lse, jnp.bfloat16)


@requires_gpu
def test_cuda_decode_mma_sync_rejects_what_it_cannot_take():
    q, k, v = _inputs(6, 2, 64, 8, 2, 80, jnp.bfloat16)
    with pytest.raises(ValueError, match="head dim 64 or 128"):
        decode_attention(q, k, v, jnp.array([3, 4], jnp.int32), backend="cuda",
                         config=KernelConfig(cuda_decode="mma_sync"))


@requires_gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("s_max", [777, 70000], ids=["short", "many-splits"])
def test_cuda_decode_return_lse(dtype, s_max):
    """The combine kernel's lse over all splits (GQA 32/8, a length-0 row)."""
    batch = 4
    q, k, v = _inputs(3, batch, s_max, 32, 8, 128, dtype)
    lengths = jnp.array([0, 1, s_max, s_max // 2 + 3], jnp.int32)
    out, lse = jax.jit(lambda *a: decode_attention(*a, backend="cuda", return_lse=True))(q, k, v, lengths)
    expected_out, expected_lse = reference_decode(q, k, v, lengths, return_lse=True)
    assert_close(out, expected_out, dtype)
    assert_lse_close(lse, expected_lse, dtype)


@requires_gpu
@pytest.mark.parametrize("page_size", [16, 256])
def test_cuda_decode_paged(page_size):
    q, k, v = _inputs(1, 4, 1000, 32, 8, 128, jnp.bfloat16)
    lengths = jnp.array([1, 1000, 255, 513], jnp.int32)
    k_pages, v_pages, table = _paged(k, v, page_size, seed=page_size)
    out = jax.jit(lambda *a: decode_attention(*a[:4], page_table=a[4], backend="cuda"))(
        q, k_pages, v_pages, lengths, table)
    assert_close(out, reference_decode(q, k, v, lengths), jnp.bfloat16)


@requires_gpu
def test_cuda_decode_vmap_and_auto_backend():
    q, k, v = _inputs(2, 6, 130, 8, 2, 64, jnp.bfloat16)
    lengths = jnp.array([3, 130, 0, 64, 65, 1], jnp.int32)
    split = lambda x: x.reshape(2, 3, *x.shape[1:])
    out = jax.vmap(lambda *a: decode_attention(*a))(split(q), split(k), split(v), split(lengths))
    assert_close(out.reshape(q.shape), reference_decode(q, k, v, lengths), jnp.bfloat16)


@requires_gpu
def test_cuda_decode_rejects_unaligned_head_dim():
    q, k, v = _inputs(3, 1, 10, 2, 2, 12, jnp.bfloat16)
    with pytest.raises(ValueError, match=r"q.shape\[-1\] must be a multiple of 8 for bfloat16, got 12"):
        decode_attention(q, k, v, jnp.array([5], jnp.int32), backend="cuda")
    # "auto" takes the pure-JAX path for what the kernel does not read
    out = decode_attention(q, k, v, jnp.array([5], jnp.int32))
    assert out.shape == q.shape
