"""Building and timing the Llama model for the CLI and the GPU benchmark:
random weights made on the device in their storage dtype (never as float32
on the host), ahead-of-time compiled prefill / decode, wall-clock timing."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from . import generation, sharding
from .config import LlamaConfig
from .model import Llama

DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}


def graphdef_for(cfg: LlamaConfig, attention: str, dtype, backend: str = "auto", layer_storage: str = "per_layer"):
    """The static half of a Llama (no weights are made)."""
    abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), attention=attention, backend=backend,
                                            dtype=dtype, param_dtype=dtype, layer_storage=layer_storage))
    return nnx.split(abstract)


def random_state(cfg: LlamaConfig, dtype, seed: int = 0, mesh=None, layer_storage: str = "per_layer"):
    """Random weights initialised inside one jit, directly in `dtype` and
    already sharded on `mesh`. The state is the same for every attention
    choice (attention is a static attribute), so one copy serves all."""
    graphdef, abstract = graphdef_for(cfg, "xla", dtype, layer_storage=layer_storage)
    shardings = None if mesh is None else sharding.param_shardings(abstract, cfg, mesh)

    def init():
        return nnx.split(Llama(cfg, rngs=nnx.Rngs(seed), attention="xla", dtype=dtype, param_dtype=dtype,
                               layer_storage=layer_storage))[1]

    return jax.jit(init, out_shardings=shardings)()


def random_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype, seed: int = 0, mesh=None):
    """k_cache, v_cache [B, L, max_len, Hkv, D] of random values (a context
    as if prefilled), made on the device."""
    shape = (batch, cfg.num_hidden_layers, max_len, cfg.num_key_value_heads, cfg.head_dim)
    layer_shape = (batch, 1) + shape[2:]
    out = None if mesh is None else NamedSharding(mesh, sharding.cache_spec(cfg, mesh))

    def fill(key):
        # One layer at a time into a zeroed buffer: the random-bit generator's
        # temporaries then take one layer's size, not the whole cache's
        # (a 32K x 8 Llama-3-8B cache is 16 GiB per array).
        def layer(index, cache):
            values = jax.random.normal(jax.random.fold_in(key, index), layer_shape, dtype)
            return lax.dynamic_update_slice(cache, values, (0, index, 0, 0, 0))
        return lax.fori_loop(0, cfg.num_hidden_layers, layer, jnp.zeros(shape, dtype))

    def make(key):
        k1, k2 = jax.random.split(key)
        return fill(k1), fill(k2)

    make = jax.jit(make) if out is None else jax.jit(make, out_shardings=(out, out))
    return make(jax.random.key(seed))


def batch_put(mesh, *arrays):
    if mesh is None:
        return arrays
    return tuple(jax.device_put(a, NamedSharding(mesh, P("data", *([None] * (np.ndim(a) - 1))))) for a in arrays)


def timed(fn, *args):
    """(result, seconds) of fn(*args), waiting for the device."""
    start = time.perf_counter()
    result = jax.block_until_ready(fn(*args))
    return result, time.perf_counter() - start


def compile_prefill(graphdef, state, prompts, lengths, max_len, mesh=None, cp_mesh=None):
    return generation.prefill.lower(graphdef, state, prompts, lengths, max_len=max_len, mesh=mesh,
                                    cp_mesh=cp_mesh).compile()


def compile_decode(graphdef, state, logits, k_cache, v_cache, lengths, key, max_new_tokens, mesh=None,
                   **sampling):
    return generation.decode.lower(graphdef, state, logits, k_cache, v_cache, lengths, key,
                                   max_new_tokens=max_new_tokens, mesh=mesh, **sampling).compile()


def param_bytes(cfg: LlamaConfig, dtype) -> int:
    return cfg.num_params() * jnp.dtype(dtype).itemsize


def decode_step_bytes(cfg: LlamaConfig, batch: int, context: float, dtype) -> float:
    """HBM bytes one decode step must read: every weight except the input
    embedding table (a gather of B rows; tied embeddings are read whole by
    the output projection), plus keys and values of `context` positions."""
    itemsize = jnp.dtype(dtype).itemsize
    weights = param_bytes(cfg, dtype)
    if not cfg.tie_word_embeddings:
        weights -= cfg.vocab_size * cfg.hidden_size * itemsize
    kv = 2 * batch * context * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * itemsize
    return weights + kv


def copy_bandwidth(nbytes: int = 2 << 30, repeats: int = 5) -> float:
    """Measured device copy bandwidth, bytes/s (read + write of an nbytes array)."""
    x = jnp.zeros((nbytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a + 1.0)
    jax.block_until_ready(copy(x))
    best = min(timed(copy, x)[1] for _ in range(repeats))
    return 2 * nbytes / best
