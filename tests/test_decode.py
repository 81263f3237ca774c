"""decode_attention against flash_attention / the reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_fastattn import decode_attention, flash_attention
from helpers import assert_close


def reference_decode(q, k_cache, v_cache, lengths):
    """Row by row: the reference over each valid prefix."""
    rows = []
    for b in range(q.shape[0]):
        n = int(lengths[b])
        if n == 0:
            rows.append(jnp.zeros(q.shape[1:], jnp.float32))
            continue
        f32 = lambda x: x.astype(jnp.float32)
        out = flash_attention(f32(q[b:b + 1, None]), f32(k_cache[b:b + 1, :n]), f32(v_cache[b:b + 1, :n]),
                              backend="reference")
        rows.append(out[0, 0])
    return jnp.stack(rows)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("heads", [(8, 2), (4, 1), (4, 4)], ids=["gqa", "mqa", "mha"])
def test_decode_ragged_lengths_with_garbage_past_length(backend, dtype, heads):
    batch, s_max, d = 5, 150, 32
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (batch, heads[0], d)).astype(dtype)
    k_cache = jax.random.normal(keys[1], (batch, s_max, heads[1], d)).astype(dtype)
    v_cache = jax.random.normal(keys[2], (batch, s_max, heads[1], d)).astype(dtype)
    lengths = jnp.array([1, s_max, 0, 77, 128], jnp.int32)
    expected = reference_decode(q, k_cache, v_cache, lengths)
    # Garbage (NaN, inf) past each length must never reach the result.
    past = jnp.arange(s_max)[None, :, None, None] >= lengths[:, None, None, None]
    k_dirty = jnp.where(past, jnp.nan, k_cache).astype(dtype)
    v_dirty = jnp.where(past, jnp.inf, v_cache).astype(dtype)
    out = jax.jit(lambda *a: decode_attention(*a, backend=backend))(q, k_dirty, v_dirty, lengths)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, expected, dtype)
    assert np.all(np.asarray(out, np.float32)[2] == 0)  # length 0 -> zeros


def test_decode_vmap(backend):
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    q = jax.random.normal(keys[0], (3, 2, 4, 16))
    k_cache = jax.random.normal(keys[1], (3, 2, 40, 2, 16))
    v_cache = jax.random.normal(keys[2], (3, 2, 40, 2, 16))
    lengths = jnp.array([[3, 40], [0, 17], [39, 1]], jnp.int32)
    out = jax.vmap(lambda *a: decode_attention(*a, backend=backend))(q, k_cache, v_cache, lengths)
    for i in range(3):
        assert_close(out[i], reference_decode(q[i], k_cache[i], v_cache[i], lengths[i]), jnp.float32)
