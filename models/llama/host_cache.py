"""generate() with the KV cache split over device memory and host memory
(`generate(..., kv_cache="host" | "auto")`, jax_fastattn.offload,
docs/OFFLOAD.md).

After the prefill, each layer's prompt keys/values are placed as an
`offload.OffloadedKV`: the newest positions in device memory, the rest in
host memory, streamed to the accelerator block by block ("stream") and/or
attended where they lie by the CPU ("split"). Only positions that every row
has filled (the shortest prompt) go to the host; the rest of the prompts and
every generated token are appended to the device part.

Each decode step, per layer: q, k, v of the new token with RoPE at the
row's length; the token's k, v appended to the device part (donated, so it
is updated in place); `offload.decode_attention_offloaded` over
lengths + 1 positions; output projection and MLP. Without a CPU part the
whole step is one jit; with one, the layer loop runs in Python (the CPU
part's attention is a separate computation on the CPU device) and only the
per-layer pieces are jitted.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jax_fastattn import offload
from jax_fastattn.offload.plan import POSITION_QUANTUM, STRATEGIES

KV_CACHE_MODES = ("device", "host", "auto")
# Fixed rates for kv_cache="host" (strategy "stream" does not depend on them
# except for the predicted time it prints): PCIe 5 x16, H200 HBM, a server CPU.
NOMINAL_THROUGHPUTS = offload.Throughputs(pcie_bytes_per_s=50e9, accelerator_bytes_per_s=4e12,
                                          cpu_bytes_per_s=25e9)


@dataclasses.dataclass(frozen=True)
class HostCacheOptions:
    """How generate() places the KV cache for kv_cache="host" / "auto".

    device_tokens: prompt positions per layer kept in device memory; None =
      as many as the free device memory holds (memory_stats minus
      device_reserve_bytes, split evenly over the layers). A small value
      forces the host path (tests).
    block_tokens: positions per streamed block; None = the planner's
      (>= 1 MiB per K or V block).
    strategy: offload.plan's strategy; None = "stream" for "host", "auto"
      for "auto".
    throughputs: offload.Throughputs; None = NOMINAL_THROUGHPUTS for "host",
      measured (offload.measure_throughputs) for "auto".
    host_kv_bytes: host memory the whole cache may use (None: unbounded).
    backend / cpu_backend: decode_attention_offloaded's.
    """
    device_tokens: Optional[int] = None
    block_tokens: Optional[int] = None
    strategy: Optional[str] = None
    throughputs: Optional[offload.Throughputs] = None
    host_kv_bytes: Optional[int] = None
    device_reserve_bytes: int = 8 << 30
    backend: str = "einsum"
    cpu_backend: str = "decode:cpu"

    def __post_init__(self):
        for name in ("device_tokens", "block_tokens", "host_kv_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < (1 if name == "block_tokens" else 0)):
                raise ValueError(f"{name} must be None or a non-negative int (block_tokens >= 1), got {value!r}")
        if self.strategy is not None and self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be None or one of {STRATEGIES}, got {self.strategy!r}")


@functools.lru_cache(maxsize=None)
def measured_throughputs(kv_heads: int, head_dim: int, q_heads: int, dtype_name: str) -> offload.Throughputs:
    """offload.measure_throughputs for these shapes, once per process."""
    return offload.measure_throughputs(kv_heads=kv_heads, head_dim=head_dim, q_heads=q_heads,
                                       dtype=jnp.dtype(dtype_name))


def free_device_bytes(device) -> Optional[int]:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def make_plan(mode: str, options: HostCacheOptions, *, context_tokens: int, extra_device_tokens: int,
              cfg, batch: int, dtype) -> offload.Plan:
    """One layer's offload.Plan for `context_tokens` host-eligible positions;
    extra_device_tokens (the rest of the prompts and the new tokens) are
    reserved in device memory first."""
    itemsize = jnp.dtype(dtype).itemsize
    per_token = 2 * batch * cfg.num_key_value_heads * cfg.head_dim * itemsize
    layers = cfg.num_hidden_layers
    strategy = options.strategy or ("stream" if mode == "host" else "auto")
    throughputs = options.throughputs
    if throughputs is None:
        throughputs = NOMINAL_THROUGHPUTS if mode == "host" else measured_throughputs(
            cfg.num_key_value_heads, cfg.head_dim, cfg.num_attention_heads, jnp.dtype(dtype).name)
    if options.device_tokens is not None:
        device_bytes, quantum = options.device_tokens * per_token, 1
    else:
        free = free_device_bytes(jax.devices()[0])
        if free is None:      # no memory statistics (CPU): everything fits
            device_bytes, quantum = context_tokens * per_token, 1
        else:
            device_bytes = max(0, (free - options.device_reserve_bytes) // layers - extra_device_tokens * per_token)
            quantum = POSITION_QUANTUM
    host_bytes = None if options.host_kv_bytes is None else options.host_kv_bytes // layers
    p = offload.plan(context_tokens, kv_bytes_per_token=per_token, device_kv_bytes=device_bytes,
                     host_kv_bytes=host_bytes, throughputs=throughputs, strategy=strategy, position_quantum=quantum)
    if options.block_tokens is not None:
        p = dataclasses.replace(p, block_tokens=options.block_tokens)
    return p


def build_caches(k_cache, v_cache, lengths, plan: offload.Plan, max_new_tokens: int, options: HostCacheOptions):
    """Per-layer OffloadedKV from the prefill's [B, L, P, Hkv, D] cache: the
    first plan.context_tokens positions split as planned, positions
    [context_tokens, P) appended to the device part, room for the new tokens."""
    prompt_len = k_cache.shape[2]
    shared = plan.context_tokens
    capacity = plan.device_tokens + (prompt_len - shared) + max_new_tokens
    start = jnp.full(lengths.shape, shared, jnp.int32)
    caches = []
    for layer in range(k_cache.shape[1]):
        k, v = k_cache[:, layer], v_cache[:, layer]
        cache = offload.OffloadedKV.build(k[:, :shared], v[:, :shared], plan, device_capacity=capacity)
        if prompt_len > shared:
            cache = cache.append(k[:, shared:], v[:, shared:], start)
        caches.append(cache)
    return caches


def split_device(cache: offload.OffloadedKV):
    """(device-only cache, the cache without its device part)."""
    return (offload.OffloadedKV(cache.device_k, cache.device_v),
            dataclasses.replace(cache, device_k=None, device_v=None))


@functools.partial(jax.jit, donate_argnums=(0,))
def append_device(device_only, k_new, v_new, device_lengths):
    """The token's k/v written into the device part in place (donated);
    device_lengths = lengths - device_start."""
    return device_only.append(k_new, v_new, device_lengths)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def embed(graphdef, state, tokens):
    return nnx.merge(graphdef, state).embed_tokens(tokens)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def logits_of(graphdef, state, x):
    return nnx.merge(graphdef, state).logits(x)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def layer_qkv(graphdef, layer_state, x, lengths):
    layer = nnx.merge(graphdef, layer_state)
    q, k, v = layer.self_attn.project(layer.input_layernorm(x)[:, None], lengths[:, None])
    return q[:, 0], k[:, 0], v[:, 0]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def layer_finish(graphdef, layer_state, x, attended):
    layer = nnx.merge(graphdef, layer_state)
    x = x + layer.self_attn.out(attended.astype(x.dtype))
    return x + layer.mlp(layer.post_attention_layernorm(x))


def decode_step(graphdef, state, layer_graphdef, layer_states, tokens, lengths, device_parts, host_parts, *,
                softmax_scale, backend, cpu_backend):
    """Logits [B, V] of tokens [B] at positions lengths [B], and the device
    parts with the tokens' k/v appended. Traceable when no layer has a CPU
    part."""
    x = embed(graphdef, state, tokens)
    new_parts = []
    for layer_state, device_only, host in zip(layer_states, device_parts, host_parts):
        q, k, v = layer_qkv(layer_graphdef, layer_state, x, lengths)
        device_only = append_device(device_only, k, v, lengths - host.device_start)
        cache = dataclasses.replace(host, device_k=device_only.device_k, device_v=device_only.device_v)
        attended = offload.decode_attention_offloaded(q, cache, lengths + 1, softmax_scale=softmax_scale,
                                                      backend=backend, cpu_backend=cpu_backend)
        x = layer_finish(layer_graphdef, layer_state, x, attended)
        new_parts.append(device_only)
    return logits_of(graphdef, state, x), new_parts


jitted_decode_step = jax.jit(decode_step, static_argnames=("graphdef", "layer_graphdef", "softmax_scale", "backend",
                                                           "cpu_backend"),
                             donate_argnames=("device_parts",))


def layer_states_of(model):
    """(graphdef, [state of layer i]) of the decoder layers: per-layer
    storage gives its own buffers; stacked storage is sliced (a copy)."""
    if model.layer_storage == "per_layer":
        states = [nnx.split(layer) for layer in model.layers]
        return states[0][0], [state for _, state in states]
    layer_graphdef, stacked = nnx.split(model.layers)
    return layer_graphdef, [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(model.cfg.num_hidden_layers)]


def place(model_cfg, k_cache, v_cache, lengths, max_new_tokens: int, *, mode: str, options: HostCacheOptions):
    """(device_parts, host_parts, plan) from the prefill's k/v [B, L, P, Hkv, D]:
    the plan over the positions every row has filled, then each layer's
    OffloadedKV split into its device part and the rest."""
    prompt_len = k_cache.shape[2]
    context = int(jnp.min(lengths))
    plan = make_plan(mode, options, context_tokens=context, extra_device_tokens=prompt_len - context + max_new_tokens,
                     cfg=model_cfg, batch=k_cache.shape[0], dtype=k_cache.dtype)
    caches = build_caches(k_cache, v_cache, lengths, plan, max_new_tokens, options)
    device_parts, host_parts = zip(*(split_device(c) for c in caches))
    return list(device_parts), list(host_parts), plan


def decode_loop(graphdef, state, logits, device_parts, host_parts, lengths, key, max_new_tokens: int, *,
                options: HostCacheOptions, sample_fn, stop, pad_id: int):
    """New tokens [B, max_new_tokens], the first from the prefill's logits,
    each next one from a decode step over the offloaded cache. The loop is
    on the host (a step may run on two devices); it ends early when every
    row has stopped."""
    model = nnx.merge(graphdef, state)
    layer_graphdef, layer_states = layer_states_of(model)
    has_cpu = any(h.cpu_k is not None for h in host_parts)
    step = decode_step if has_cpu else jitted_decode_step
    static = dict(softmax_scale=model.first_layer().self_attn.softmax_scale, backend=options.backend,
                  cpu_backend=options.cpu_backend)
    batch = logits.shape[0]
    tokens = [sample_fn(logits, jax.random.fold_in(key, 0))]
    done = jnp.isin(tokens[0], stop)
    for index in range(1, max_new_tokens):
        if bool(jnp.all(done)):
            tokens.extend([jnp.full((batch,), pad_id, jnp.int32)] * (max_new_tokens - index))
            break
        logits, device_parts = step(graphdef, state, layer_graphdef, layer_states, tokens[-1], lengths,
                                    device_parts, host_parts, **static)
        nxt = jnp.where(done, pad_id, sample_fn(logits, jax.random.fold_in(key, index)))
        tokens.append(nxt)
        done = done | jnp.isin(nxt, stop)
        lengths = lengths + 1
    return jnp.stack(tokens, axis=1)
