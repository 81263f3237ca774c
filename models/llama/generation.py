"""generate(): jitted prefill, then the whole token loop in one jitted
`lax.while_loop` with the KV cache donated (no per-token host round trip).

Prompts are right-padded [B, P] with prompt_lengths [B]: row b's next token
goes to position prompt_lengths[b], and the decode kernel's `lengths` make it
attend to that row's own prefix only, so ragged batches need no masks.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_fastattn.parallel.tiling_allreduce import overlap_compiler_options

from . import host_cache, sharding


def sample(logits, key, temperature: float, top_k: Optional[int], top_p: Optional[float]):
    """Next token [B] from float logits [B, V]: argmax when temperature == 0,
    else a draw from softmax(logits / temperature) restricted to the top_k
    tokens and to the smallest set whose probability reaches top_p (nucleus,
    Holtzman et al. 2019; the most likely token is always kept)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above
        keep = before < top_p
        threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# The prefill may hold tp_attention_block (model.tp_attention): its chunked
# all-reduces overlap the next chunk only with these options (a nested jit
# cannot carry them). The decode step keeps one plain all-reduce per layer.
@functools.partial(jax.jit, static_argnames=("graphdef", "max_len", "mesh", "cp_mesh"),
                   compiler_options=overlap_compiler_options())
def prefill(graphdef, state, prompts, prompt_lengths, *, max_len: int, mesh=None, cp_mesh=None):
    """(last-token logits [B, V], k_cache, v_cache [B, L, max_len, Hkv, D]).
    cp_mesh: context-parallel prefill over its "cp" axis (Llama.prefill)."""
    model = nnx.merge(graphdef, state)
    return model.prefill(prompts, prompt_lengths, max_len, mesh=mesh, cp_mesh=cp_mesh)


def to_one_device(*arrays):
    """A context-parallel prefill's outputs (replicated over the "cp"
    devices) moved to the first device, where decode runs."""
    return jax.device_put(arrays, jax.devices()[0])


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p",
                                             "stop_tokens", "pad_id", "mesh"),
                   donate_argnames=("k_cache", "v_cache"))
def decode(graphdef, state, logits, k_cache, v_cache, lengths, key, *, max_new_tokens: int,
           temperature: float = 0.0, top_k=None, top_p=None, stop_tokens=(), pad_id: int = 0, mesh=None):
    """Sample max_new_tokens tokens [B, n], the first from `logits` (the
    prefill's), each next one from a decode step over the cache (lengths[b]
    = cached tokens of row b). Rows stop after a stop token (later positions
    hold pad_id); the loop ends when every row has stopped. Returns (tokens,
    k_cache, v_cache)."""
    model = nnx.merge(graphdef, state)
    stop = jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)
    batch = logits.shape[0]
    first = sample(logits, jax.random.fold_in(key, 0), temperature, top_k, top_p)
    tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, stop)

    def cond(carry):
        step, _, _, _, _, _, done = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, last, k_cache, v_cache, lengths, tokens, done = carry
        logits, k_cache, v_cache = model.decode_step(last, k_cache, v_cache, lengths, mesh=mesh)
        nxt = sample(logits, jax.random.fold_in(key, step), temperature, top_k, top_p)
        nxt = jnp.where(done, pad_id, nxt)
        tokens = lax.dynamic_update_slice(tokens, nxt[:, None], (0, step))
        return step + 1, nxt, k_cache, v_cache, lengths + 1, tokens, done | jnp.isin(nxt, stop)

    carry = (jnp.int32(1), first, k_cache, v_cache, jnp.asarray(lengths, jnp.int32), tokens, done)
    _, _, k_cache, v_cache, _, tokens, _ = lax.while_loop(cond, body, carry)
    return tokens, k_cache, v_cache


def check_args(model, prompts, prompt_lengths, max_new_tokens, key, temperature, top_k, top_p, stop_tokens):
    if np.ndim(prompts) != 2:
        raise ValueError(f"prompts must be int [B, P] (right-padded), got shape {np.shape(prompts)}")
    if not jnp.issubdtype(jnp.result_type(prompts), jnp.integer):
        raise ValueError(f"prompts must be integer token ids, got dtype {jnp.result_type(prompts)}")
    batch, prompt_len = np.shape(prompts)
    if np.shape(prompt_lengths) != (batch,):
        raise ValueError(f"prompt_lengths must have shape [B] = ({batch},), got {np.shape(prompt_lengths)}")
    if not isinstance(prompt_lengths, jax.core.Tracer):
        lengths = np.asarray(prompt_lengths)
        if lengths.min() < 1 or lengths.max() > prompt_len:
            raise ValueError(f"prompt_lengths must be in [1, P={prompt_len}], got {lengths.tolist()}")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a float >= 0 (0 = greedy), got {temperature!r}")
    if temperature > 0 and key is None:
        raise ValueError("key (a jax PRNG key) is required when temperature > 0")
    vocab = model.cfg.vocab_size
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= vocab):
        raise ValueError(f"top_k must be None or an int in [1, vocab_size={vocab}], got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
    if any(not isinstance(t, (int, np.integer)) for t in stop_tokens):
        raise ValueError(f"stop_tokens must be a sequence of ints, got {stop_tokens!r}")


def place(graphdef, state, mesh, *arrays):
    """Put params (sharded by sharding.param_shardings) and batch-leading
    arrays (batch over "data") on the mesh; no-op without a mesh."""
    if mesh is None:
        return (state,) + arrays
    cfg = nnx.merge(graphdef, state).cfg
    state = jax.device_put(state, sharding.param_shardings(state, cfg, mesh))
    batch_first = lambda a: jax.device_put(a, NamedSharding(mesh, P("data", *([None] * (np.ndim(a) - 1)))))
    return (state,) + tuple(batch_first(a) for a in arrays)


def generate(model, prompts, prompt_lengths, max_new_tokens: int, key=None, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, stop_tokens: Sequence[int] = (),
             mesh=None, pad_id: int = 0, kv_cache: str = "device",
             host_cache_options: Optional[host_cache.HostCacheOptions] = None,
             context_parallel: Optional[int] = None):
    """New tokens [B, max_new_tokens] int32 after right-padded prompts [B, P].

    Greedy when temperature == 0, else sampled (top_k / top_p) with `key`.
    A row stops after a stop token; its later positions hold pad_id. mesh:
    a Mesh with axes ("data", "model") to run sharded (params and KV cache
    heads over "model", batch over "data"); None = one device.

    kv_cache: "device" (the whole cache in device memory, one jitted decode
    loop), "host" (the prompt's positions beyond what device memory holds
    streamed from host memory, jax_fastattn.offload strategy "stream") or
    "auto" (measured throughputs, the planner's mix of streaming and CPU
    attention); one device only. host_cache_options: a
    host_cache.HostCacheOptions (e.g. a forced device_tokens budget).

    context_parallel: N > 1 runs the prefill with the sequence split over
    N devices (mesh axis "cp": ring or all-gather attention, zig-zag
    layout); decode then runs on the first device. None or 1: off.
    """
    check_args(model, prompts, prompt_lengths, max_new_tokens, key, temperature, top_k, top_p, stop_tokens)
    sharding.check_mesh(mesh, np.shape(prompts)[0])
    if kv_cache not in host_cache.KV_CACHE_MODES:
        raise ValueError(f"kv_cache must be one of {host_cache.KV_CACHE_MODES}, got {kv_cache!r}")
    if kv_cache != "device" and mesh is not None:
        raise ValueError(f"kv_cache={kv_cache!r} runs on one device: pass mesh=None")
    if host_cache_options is not None and not isinstance(host_cache_options, host_cache.HostCacheOptions):
        raise ValueError("host_cache_options must be None or a models.llama.host_cache.HostCacheOptions, got "
                         f"{type(host_cache_options).__name__}")
    cp_mesh = None
    if context_parallel is not None and context_parallel != 1:
        if mesh is not None:
            raise ValueError("context_parallel cannot be combined with mesh: pass one of them")
        cp_mesh = sharding.make_cp_mesh(context_parallel)
    graphdef, state = nnx.split(model)
    prompts, lengths = jnp.asarray(prompts, jnp.int32), jnp.asarray(prompt_lengths, jnp.int32)
    state, prompts, lengths = place(graphdef, state, mesh, prompts, lengths)
    key = jax.random.key(0) if key is None else key

    def run_prefill(max_len):
        out = prefill(graphdef, state, prompts, lengths, max_len=max_len, mesh=mesh, cp_mesh=cp_mesh)
        return out if cp_mesh is None else to_one_device(*out)

    if kv_cache != "device":
        options = host_cache_options or host_cache.HostCacheOptions()
        logits, k_cache, v_cache = run_prefill(prompts.shape[1])
        device_parts, host_parts, _ = host_cache.place(model.cfg, k_cache, v_cache, lengths, max_new_tokens,
                                                       mode=kv_cache, options=options)
        del k_cache, v_cache
        return host_cache.decode_loop(
            graphdef, state, logits, device_parts, host_parts, lengths, key, max_new_tokens, options=options,
            stop=jnp.asarray(tuple(int(t) for t in stop_tokens) or (-1,), jnp.int32), pad_id=pad_id,
            sample_fn=lambda logits, k: sample(logits, k, float(temperature), top_k, top_p))
    logits, k_cache, v_cache = run_prefill(prompts.shape[1] + max_new_tokens)
    tokens, _, _ = decode(graphdef, state, logits, k_cache, v_cache, lengths, key, max_new_tokens=max_new_tokens,
                          temperature=float(temperature), top_k=top_k, top_p=top_p,
                          stop_tokens=tuple(int(t) for t in stop_tokens), pad_id=pad_id, mesh=mesh)
    return tokens
