"""decode_attention against flash_attention / the reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_fastattn import decode_attention, flash_attention
from helpers import assert_close


def reference_decode(q, k_cache, v_cache, lengths, return_lse=False):
    """Row by row: the reference over each valid prefix (and its lse, -inf
    for a row of length 0)."""
    rows, lses = [], []
    for b in range(q.shape[0]):
        n = int(lengths[b])
        if n == 0:
            rows.append(jnp.zeros(q.shape[1:], jnp.float32))
            lses.append(jnp.full(q.shape[1:2], -jnp.inf, jnp.float32))
            continue
        f32 = lambda x: x.astype(jnp.float32)
        out, lse = flash_attention(f32(q[b:b + 1, None]), f32(k_cache[b:b + 1, :n]), f32(v_cache[b:b + 1, :n]),
                                   backend="reference", return_lse=True)
        rows.append(out[0, 0])
        lses.append(lse[0, :, 0])
    return (jnp.stack(rows), jnp.stack(lses)) if return_lse else jnp.stack(rows)


def garbage_past_length(k_cache, v_cache, lengths):
    """K with NaN and V with inf at every position at or past each row's
    length: a kernel that reads them poisons its result."""
    past = jnp.arange(k_cache.shape[1])[None, :, None, None] >= lengths[:, None, None, None]
    return (jnp.where(past, jnp.nan, k_cache).astype(k_cache.dtype),
            jnp.where(past, jnp.inf, v_cache).astype(v_cache.dtype))


def _vmapped_inputs(seed):
    """q [2, 3, 4, 16], caches [2, 3, 50, 2, 16] and ragged lengths [2, 3]
    (0, 1 and full rows among them), for tests under vmap."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(keys[0], (2, 3, 4, 16))
    k_cache = jax.random.normal(keys[1], (2, 3, 50, 2, 16))
    v_cache = jax.random.normal(keys[2], (2, 3, 50, 2, 16))
    return q, k_cache, v_cache, jnp.array([[3, 50, 0], [17, 1, 49]], jnp.int32)


def assert_lse_close(lse, expected, dtype):
    """Finite entries close (bf16/f16 inputs round the logits), -inf where expected."""
    lse, expected = np.asarray(lse), np.asarray(expected)
    assert lse.shape == expected.shape and lse.dtype == np.float32
    empty = np.isneginf(expected)
    assert np.array_equal(np.isneginf(lse), empty)
    tol = 1e-4 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(lse[~empty], expected[~empty], rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("heads", [(8, 2), (4, 1), (4, 4), (16, 2)], ids=["gqa", "mqa", "mha", "gqa-8"])
def test_decode_ragged_lengths_with_garbage_past_length(backend, dtype, heads):
    batch, s_max, d = 5, 150, 32
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (batch, heads[0], d)).astype(dtype)
    k_cache = jax.random.normal(keys[1], (batch, s_max, heads[1], d)).astype(dtype)
    v_cache = jax.random.normal(keys[2], (batch, s_max, heads[1], d)).astype(dtype)
    lengths = jnp.array([1, s_max, 0, 77, 128], jnp.int32)
    expected = reference_decode(q, k_cache, v_cache, lengths)
    # Garbage (NaN, inf) past each length must never reach the result.
    k_dirty, v_dirty = garbage_past_length(k_cache, v_cache, lengths)
    out = jax.jit(lambda *a: decode_attention(*a, backend=backend))(q, k_dirty, v_dirty, lengths)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, expected, dtype)
    assert np.all(np.asarray(out, np.float32)[2] == 0)  # length 0 -> zeros


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("heads", [(8, 2), (4, 4)], ids=["gqa", "mha"])
def test_decode_return_lse(backend, dtype, heads):
    """The lse is the row's log-sum-exp over its valid keys (what
    merge_partials needs); -inf and zeros for length 0; garbage past the
    length never reaches it; the output equals the call without lse."""
    batch, s_max, d = 5, 300, 48
    keys = jax.random.split(jax.random.PRNGKey(7), 3)
    q = (3 * jax.random.normal(keys[0], (batch, heads[0], d))).astype(dtype)
    k_cache = jax.random.normal(keys[1], (batch, s_max, heads[1], d)).astype(dtype)
    v_cache = jax.random.normal(keys[2], (batch, s_max, heads[1], d)).astype(dtype)
    lengths = jnp.array([0, 1, s_max, 129, 2], jnp.int32)
    expected_out, expected_lse = reference_decode(q, k_cache, v_cache, lengths, return_lse=True)
    k_dirty, v_dirty = garbage_past_length(k_cache, v_cache, lengths)
    fn = jax.jit(lambda *a: decode_attention(*a, backend=backend, softmax_scale=0.3, return_lse=True))
    out, lse = fn(q, k_dirty, v_dirty, lengths)
    ref_out, ref_lse = flash_attention(q[:, None], k_cache, v_cache, backend="reference", return_lse=True,
                                       softmax_scale=0.3, mask=_prefix_mask(lengths, s_max))
    assert_close(out, ref_out[:, 0], dtype)
    assert_lse_close(lse, jnp.where(lengths[:, None] > 0, ref_lse[:, :, 0], -jnp.inf), dtype)
    assert np.all(np.asarray(out, np.float32)[0] == 0)
    plain = jax.jit(lambda *a: decode_attention(*a, backend=backend, softmax_scale=0.3))(q, k_dirty, v_dirty, lengths)
    np.testing.assert_array_equal(np.asarray(plain, np.float32), np.asarray(out, np.float32))
    # Default scale: against the row-by-row reference.
    out, lse = jax.jit(lambda *a: decode_attention(*a, backend=backend, return_lse=True))(q, k_cache, v_cache, lengths)
    assert_close(out, expected_out, dtype)
    assert_lse_close(lse, expected_lse, dtype)


def _prefix_mask(lengths, s_max):
    from jax_fastattn import masks
    kv_ids = jnp.where(jnp.arange(s_max)[None, :] < lengths[:, None], 0, -1).astype(jnp.int32)
    return masks.Segments(jnp.zeros((lengths.shape[0], 1), jnp.int32), kv_ids)


def test_decode_return_lse_vmap_and_paged(backend):
    q, k_cache, v_cache, lengths = _vmapped_inputs(8)
    out, lse = jax.vmap(lambda *a: decode_attention(*a, backend=backend, return_lse=True))(
        q, k_cache, v_cache, lengths)
    pools = [_paged(k_cache[i], v_cache[i], 16, seed=i) for i in range(2)]
    k_pages, v_pages, tables = (jnp.stack([p[j] for p in pools]) for j in range(3))
    paged_out, paged_lse = jax.vmap(lambda *a: decode_attention(*a[:4], page_table=a[4], backend=backend,
                                                                return_lse=True))(q, k_pages, v_pages, lengths, tables)
    for i in range(2):
        expected_out, expected_lse = reference_decode(q[i], k_cache[i], v_cache[i], lengths[i], return_lse=True)
        for o, l in ((out, lse), (paged_out, paged_lse)):
            assert_close(o[i], expected_out, jnp.float32)
            assert_lse_close(l[i], expected_lse, jnp.float32)


def test_cuda_decode_option_errors():
    from jax_fastattn.config import KernelConfig
    from jax_fastattn.decode import _decode_config
    q, k = jnp.zeros((1, 32, 128), jnp.bfloat16), jnp.zeros((1, 8, 8, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="cuda_decode must be one of"):
        KernelConfig(cuda_decode="tensor")
    from jax_fastattn import ffi
    with pytest.raises(ValueError, match="cuda_decode must be one of"):
        ffi.decode_ffi("cuda", 1.0, cuda_decode="tensor")
    with pytest.raises(ValueError, match="config.cuda_decode chooses the CUDA decode kernel.*backend='cpu'"):
        decode_attention(q, k, k, jnp.array([3], jnp.int32), backend="cpu",
                         config=KernelConfig(cuda_decode="simt"))
    with pytest.raises(ValueError, match="flash_attention does not take it"):
        flash_attention(q[:, None], k, k, backend="cpu", config=KernelConfig(cuda_decode="mma_sync"))
    mma = KernelConfig(cuda_decode="mma_sync")
    assert _decode_config(mma, "cuda", q, k) is mma      # GQA 32/8, bf16, D=128: taken
    with pytest.raises(ValueError, match=r"bfloat16 or float16 \(got float32\), head dim 64 or 128 \(got 96\), "
                                         r"at most 16 q heads per kv head \(got 32\); use 'simt'"):
        _decode_config(mma, "cuda", jnp.zeros((1, 32, 96)), jnp.zeros((1, 8, 1, 96)))


def test_decode_return_lse_must_be_bool():
    q = jnp.zeros((1, 2, 8))
    k = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="return_lse must be a Python bool"):
        decode_attention(q, k, k, jnp.array([2], jnp.int32), backend="cpu", return_lse="yes")


def test_decode_vmap(backend):
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    q = jax.random.normal(keys[0], (3, 2, 4, 16))
    k_cache = jax.random.normal(keys[1], (3, 2, 40, 2, 16))
    v_cache = jax.random.normal(keys[2], (3, 2, 40, 2, 16))
    lengths = jnp.array([[3, 40], [0, 17], [39, 1]], jnp.int32)
    out = jax.vmap(lambda *a: decode_attention(*a, backend=backend))(q, k_cache, v_cache, lengths)
    for i in range(3):
        assert_close(out[i], reference_decode(q[i], k_cache[i], v_cache[i], lengths[i]), jnp.float32)


def _paged(k_cache, v_cache, page_size, seed):
    """Scatter contiguous caches into a shuffled pool of pages (plus spare
    garbage pages) and return (k_pages, v_pages, page_table)."""
    batch, s_max = k_cache.shape[:2]
    per_row = -(-s_max // page_size)
    pad = per_row * page_size - s_max
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    k_rows = jnp.pad(k_cache, widths).reshape(batch * per_row, page_size, *k_cache.shape[2:])
    v_rows = jnp.pad(v_cache, widths).reshape(batch * per_row, page_size, *v_cache.shape[2:])
    spare = 3
    garbage = jnp.full((spare, page_size) + k_cache.shape[2:], jnp.nan, k_cache.dtype)
    k_pool = jnp.concatenate([k_rows, garbage])
    v_pool = jnp.concatenate([v_rows, garbage])
    order = np.random.default_rng(seed).permutation(batch * per_row + spare)
    where = np.argsort(order)  # pool index of each original page
    table = jnp.asarray(where[:batch * per_row].reshape(batch, per_row), jnp.int32)
    return k_pool[order], v_pool[order], table


@pytest.mark.parametrize("page_size", [16, 24, 256])  # 24: blocks of 16 keys straddle pages
@pytest.mark.parametrize("heads", [(32, 8), (4, 1)], ids=["gqa-32/8", "mqa"])
def test_paged_cache(backend, page_size, heads):
    batch, s_max, d = 4, 600, 64
    keys = jax.random.split(jax.random.PRNGKey(2), 3)
    q = jax.random.normal(keys[0], (batch, heads[0], d), jnp.bfloat16)
    k_cache = jax.random.normal(keys[1], (batch, s_max, heads[1], d), jnp.bfloat16)
    v_cache = jax.random.normal(keys[2], (batch, s_max, heads[1], d), jnp.bfloat16)
    lengths = jnp.array([1, s_max, 255, 257], jnp.int32)
    k_pages, v_pages, table = _paged(k_cache, v_cache, page_size, seed=page_size)
    fn = jax.jit(lambda q, k, v, n, t: decode_attention(q, k, v, n, page_table=t, backend=backend))
    out = fn(q, k_pages, v_pages, lengths, table)
    assert_close(out, reference_decode(q, k_cache, v_cache, lengths), jnp.bfloat16)


def test_paged_vmap(backend):
    q, k_cache, v_cache, lengths = _vmapped_inputs(3)
    pools = [_paged(k_cache[i], v_cache[i], 16, seed=i) for i in range(2)]
    k_pages, v_pages, tables = (jnp.stack([p[j] for p in pools]) for j in range(3))
    out = jax.vmap(lambda *a: decode_attention(*a[:4], page_table=a[4], backend=backend))(
        q, k_pages, v_pages, lengths, tables)
    for i in range(2):
        assert_close(out[i], reference_decode(q[i], k_cache[i], v_cache[i], lengths[i]), jnp.float32)


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 host devices")
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_decode_sharded_over_batch_and_heads(paged):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import re
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("batch", "heads"))
    keys = jax.random.split(jax.random.PRNGKey(4), 3)
    batch, s_max = 4, 96
    q = jax.random.normal(keys[0], (batch, 8, 32))
    k_cache = jax.random.normal(keys[1], (batch, s_max, 4, 32))
    v_cache = jax.random.normal(keys[2], (batch, s_max, 4, 32))
    lengths = jnp.array([5, 96, 0, 40], jnp.int32)
    expected, expected_lse = reference_decode(q, k_cache, v_cache, lengths, return_lse=True)
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    args = [put(q, P("batch", "heads", None))]
    if paged:
        k_pages, v_pages, table = _paged(k_cache, v_cache, 16, seed=5)
        args += [put(k_pages, P(None, None, "heads", None)), put(v_pages, P(None, None, "heads", None)),
                 put(lengths, P("batch")), put(table, P("batch", None))]
        fn = jax.jit(lambda q, k, v, n, t: decode_attention(q, k, v, n, page_table=t, backend="cpu",
                                                            return_lse=True))
    else:
        args += [put(k_cache, P("batch", None, "heads", None)), put(v_cache, P("batch", None, "heads", None)),
                 put(lengths, P("batch"))]
        fn = jax.jit(lambda q, k, v, n: decode_attention(q, k, v, n, backend="cpu", return_lse=True))
    compiled = fn.lower(*args).compile()
    out, lse = compiled(*args)
    assert_close(out, expected, jnp.float32)
    assert_lse_close(lse, expected_lse, jnp.float32)
    assert lse.sharding.is_equivalent_to(NamedSharding(mesh, P("batch", "heads")), 2)
    hlo = compiled.as_text()
    assert not re.search(r"\b(all-gather|all-to-all|collective-permute)\b", hlo)
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, P("batch", "heads", None)), 3)


@pytest.mark.parametrize("dtype,head_dim,q_heads,kv_heads,expected", [
    (jnp.bfloat16, 128, 32, 8, "mma_sync"), (jnp.float16, 64, 16, 1, "mma_sync"),
    (jnp.float32, 128, 32, 8, "simt"), (jnp.bfloat16, 96, 32, 8, "simt"), (jnp.bfloat16, 128, 64, 2, "simt")])
def test_cuda_decode_auto_kernel_choice(dtype, head_dim, q_heads, kv_heads, expected):
    from jax_fastattn.config import KernelConfig
    from jax_fastattn.decode import cuda_decode_kernel
    q = jax.ShapeDtypeStruct((2, q_heads, head_dim), dtype)
    k_cache = jax.ShapeDtypeStruct((2, 64, kv_heads, head_dim), dtype)
    assert cuda_decode_kernel(KernelConfig(), q, k_cache) == expected
    assert cuda_decode_kernel(KernelConfig(cuda_decode="simt"), q, k_cache) == "simt"


def test_decode_num_splits_counts_each_kernels_ctas():
    from jax_fastattn.decode import _MMA_WAVE_FILL, _SIMT_TARGET_CTAS, _SMS, decode_num_splits
    # A simt CTA takes up to 8 q heads, so a group of 16 has two CTAs per kv
    # head, and its grid lands on its target.
    splits = decode_num_splits(1, 8, 16, 1 << 20, "simt")
    assert _SIMT_TARGET_CTAS <= splits * 16 < _SIMT_TARGET_CTAS + 16
    # A mma_sync CTA takes the whole group; its grid fills whole waves of 2
    # CTAs per SM at D=128 and 4 at D=64, with the fewest splits that do.
    for head_dim, per_sm in ((128, 2), (64, 4)):
        slots = _SMS * per_sm
        for batch, kv_heads in ((1, 8), (8, 8), (32, 8), (3, 1), (5, 4)):
            splits = decode_num_splits(batch, kv_heads, 16, 1 << 20, "mma_sync", head_dim)
            fill = lambda s: batch * kv_heads * s / (-(-(batch * kv_heads * s) // slots) * slots)  # noqa: E731
            assert fill(splits) >= _MMA_WAVE_FILL and batch * kv_heads * splits >= _MMA_WAVE_FILL * slots
            assert splits == 1 or not (fill(splits - 1) >= _MMA_WAVE_FILL and
                                       batch * kv_heads * (splits - 1) >= _MMA_WAVE_FILL * slots)
    assert decode_num_splits(1, 8, 4, 1 << 20, "mma_sync", 128) == 32     # 256 of 264 slots
    assert decode_num_splits(1, 8, 4, 300, "mma_sync") == 2     # at least 256 keys per split
    assert decode_num_splits(1024, 8, 4, 1 << 16, "simt") == 1   # the batch alone fills the card
    assert decode_num_splits(300, 8, 4, 1 << 16, "mma_sync") == 1   # 10 waves: the last one's gap is small
