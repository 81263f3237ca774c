"""Shared helpers: random inputs and dtype-scaled comparisons."""
import jax
import jax.numpy as jnp
import numpy as np

# Relative to the reference's scale (max |ref|), per dtype.
TOLERANCE = {"float32": 2e-5, "bfloat16": 2e-2, "float16": 4e-3}
GRAD_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}


def random_qkv(seed, batch, q_len, kv_len, q_heads, kv_heads, head_dim, dtype=jnp.float32):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(keys[0], (batch, q_len, q_heads, head_dim), jnp.float32)
    k = jax.random.normal(keys[1], (batch, kv_len, kv_heads, head_dim), jnp.float32)
    v = jax.random.normal(keys[2], (batch, kv_len, kv_heads, head_dim), jnp.float32)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def assert_close(actual, expected, dtype, tolerance=None, what="output"):
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    expected = np.asarray(jnp.asarray(expected, jnp.float32))
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert np.array_equal(np.isfinite(actual), np.isfinite(expected)), f"{what}: finite pattern differs"
    finite = np.isfinite(expected)
    assert np.array_equal(actual[~finite], expected[~finite]), f"{what}: non-finite values differ"
    if not finite.any():
        return
    scale = max(float(np.max(np.abs(expected[finite]))), 1e-6)
    error = float(np.max(np.abs(actual[finite] - expected[finite])))
    limit = (tolerance or TOLERANCE[jnp.dtype(dtype).name]) * scale
    assert error <= limit, f"{what}: max error {error:.3g} > {limit:.3g} (scale {scale:.3g})"


def tiny_llama():
    """The Llama "tiny" preset on the CPU kernels with weights 10x the default
    init (std 0.2), so that greedy decoding does not collapse to one repeated
    token and argmax margins are wide."""
    from flax import nnx
    from models.llama import Llama, LlamaConfig
    model = Llama(LlamaConfig.preset("tiny"), rngs=nnx.Rngs(0), backend="cpu")
    nnx.update(model, jax.tree.map(lambda p: p * 10, nnx.state(model, nnx.Param)))
    return model
