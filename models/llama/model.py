"""Llama-family decoder in Flax NNX: RMSNorm, SwiGLU MLP, GQA attention with
RoPE (jax_fastattn.nn.Attention), tied or untied embeddings.

Layer storage (`Llama(..., layer_storage=...)`): "per_layer" (default)
keeps one module, and so one buffer per parameter, per layer and runs them
in a Python loop, so no program slices a layer's weights out of a stacked
array: batch-1 decode streams every weight once per token. "stacked" keeps
every decoder-layer parameter with a leading [num_hidden_layers] axis (made
with nnx.vmap) and runs the layers with `lax.scan`, so compile time does not
grow with depth; but XLA on GPU materialises each layer's weight slice
before its GEMV (a read and a write more per weight): on an H100 a batch-1
Llama-3-8B weight stream runs at 0.96 TB/s scanned against 2.84 TB/s
unrolled (tools/gpu/decode_weight_stream.py). `with_layer_storage` converts
a model between the two.

KV cache: two arrays, keys and values, each [B, L, Smax, Hkv, D] (batch
first, so that the per-token write is a batched scatter with no transpose and
the paged view below is a free reshape). `attend_layer_cache` is the one place
where decode attention reads the cache.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jax_fastattn import masks
from jax_fastattn import nn as fa_nn
from jax_fastattn.parallel import context_parallel_attention, from_zigzag, to_zigzag, tp_attention_block
from jax_fastattn.parallel.tiling_allreduce import rope_tables

from . import sharding
from .config import LlamaConfig

INIT = nnx.initializers.normal(0.02)  # Hugging Face initializer_range
LAYER_STORAGE = ("stacked", "per_layer")


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, computed in float32 (as Hugging Face LlamaRMSNorm)."""

    def __init__(self, features: int, eps: float, *, param_dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((features,), param_dtype))
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        xf = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * xf.astype(x.dtype)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        lin = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, kernel_init=INIT, rngs=rngs)
        self.gate_proj = nnx.Linear(cfg.hidden_size, cfg.intermediate_size, **lin)
        self.up_proj = nnx.Linear(cfg.hidden_size, cfg.intermediate_size, **lin)
        self.down_proj = nnx.Linear(cfg.intermediate_size, cfg.hidden_size, **lin)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, attention: str, backend: str, dtype, param_dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = fa_nn.Attention(
            cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
            rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling, implementation=attention, backend=backend,
            dtype=dtype, param_dtype=param_dtype, kernel_init=INIT, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def uses_tp_block(attn: fa_nn.Attention, mesh) -> bool:
    """Whether a prefill layer runs as `tp_attention_block` (tiling-AllReduce,
    docs/TILING_ALLREDUCE.md): our kernels, a "model" axis of more than one
    device, and both head counts split evenly over it."""
    model_axis = sharding.axis_size(mesh, "model")
    return (attn.implementation == "fastattn" and model_axis > 1 and attn.num_heads % model_axis == 0
            and attn.num_kv_heads % model_axis == 0)


def tp_attention(attn: fa_nn.Attention, h, positions, mesh):
    """Attention block of one layer with heads over "model" and the output
    all-reduce tiled over sequence chunks: h [B, S, d] (normalised input),
    positions [B, S] -> (y [B, S, d], k, v [B, S, Hkv, D] after RoPE).

    Right-padded rows are exact where it matters: causal attention keeps each
    real position's keys among the real ones before it; padding positions
    compute values nobody reads (decode masks them out by length)."""
    d = h.shape[-1]
    dt = attn.dtype or h.dtype
    # LinearGeneral kernels [d, H, D] / [H, D, d] are head-major once flattened.
    params = {"wq": attn.query.kernel[...].reshape(d, -1).astype(dt),
              "wk": attn.key.kernel[...].reshape(d, -1).astype(dt),
              "wv": attn.value.kernel[...].reshape(d, -1).astype(dt),
              "wo": attn.out.kernel[...].reshape(-1, d).astype(dt)}
    window = None if attn.sliding_window is None else masks.SlidingWindow(attn.sliding_window - 1, 0)
    rope = None if attn.inv_freq is None else rope_tables(positions, attn.inv_freq)
    return tp_attention_block(h.astype(dt), params, mesh=mesh, axis="model", num_chunks="auto", causal=True,
                              mask=window, num_heads=attn.num_heads, num_kv_heads=attn.num_kv_heads,
                              head_dim=attn.head_dim, rope=rope, softmax_scale=attn.softmax_scale,
                              backend=attn.backend, return_kv=True)


def attend_layer_cache(attn: fa_nn.Attention, q, k_cache, v_cache, layer, lengths, mesh=None):
    """Decode attention of layer `layer`: q [B, Hq, D] over the first
    lengths[b] positions of k_cache/v_cache [B, L, Smax, Hkv, D].

    For our kernels with an unsplit batch the stacked cache is handed over
    whole as pages: [B * L, Smax, Hkv, D] is a free reshape, and row b of
    layer l is page b * L + l. A slice cache[:, l] would be copied out first
    (XLA materialises a slice that feeds a custom call). With the batch split
    over "data" the slice is taken instead (the paged rule replicates pages).
    """
    batch, layers, s_max = k_cache.shape[:3]
    paged = attn.implementation == "fastattn" and attn.sliding_window is None and \
        sharding.axis_size(mesh, "data") == 1
    if paged:
        page_table = (jnp.arange(batch, dtype=jnp.int32) * layers + layer)[:, None]
        pages = lambda c: c.reshape(batch * layers, s_max, *c.shape[3:])
        return attn.attend_cache(q, fa_nn.KVCache(pages(k_cache), pages(v_cache), lengths, page_table))
    take = lambda c: lax.dynamic_index_in_dim(c, layer, axis=1, keepdims=False)
    return attn.attend_cache(q, fa_nn.KVCache(take(k_cache), take(v_cache), lengths))


def write_token(cache, layer, new, positions):
    """cache [B, L, Smax, Hkv, D] with new [B, Hkv, D] stored at (b, layer,
    positions[b]): a scatter batched over B, done in place on a donated buffer."""
    def one_row(row, value, pos):
        return lax.dynamic_update_slice(row, value[None, None].astype(row.dtype), (layer, pos, 0, 0))
    return jax.vmap(one_row)(cache, new, positions)


class Llama(nnx.Module):
    """Llama-family decoder. `model(tokens)` -> float32 logits [B, S, vocab].

    attention: "fastattn" (jax_fastattn kernels), "cudnn" or "xla"
    (jax.nn.dot_product_attention). backend: jax_fastattn backend for
    "fastattn". dtype: activation dtype; param_dtype: weight storage.
    """

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, attention: str = "fastattn", backend: str = "auto",
                 dtype=jnp.float32, param_dtype=jnp.float32, layer_storage: str = "per_layer"):
        if not isinstance(cfg, LlamaConfig):
            raise ValueError(f"cfg must be a LlamaConfig, got {type(cfg).__name__}")
        if attention not in fa_nn.IMPLEMENTATIONS:
            raise ValueError(f"attention must be one of {fa_nn.IMPLEMENTATIONS}, got {attention!r}")
        if layer_storage not in LAYER_STORAGE:
            raise ValueError(f"layer_storage must be one of {LAYER_STORAGE}, got {layer_storage!r}")
        fa_nn.check_implementation(attention)
        self.cfg, self.attention, self.dtype = cfg, attention, dtype
        self.backend, self.layer_storage = backend, layer_storage
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                      embedding_init=INIT, rngs=rngs)

        def make_layer(rngs):
            return DecoderLayer(cfg, attention=attention, backend=backend, dtype=dtype, param_dtype=param_dtype,
                                rngs=rngs)

        if layer_storage == "per_layer":
            self.layers = nnx.List([make_layer(rngs) for _ in range(cfg.num_hidden_layers)])
        else:
            self.layers = nnx.split_rngs(splits=cfg.num_hidden_layers)(
                nnx.vmap(make_layer, in_axes=(0,), out_axes=0))(rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.lm_head = None if cfg.tie_word_embeddings else nnx.Linear(
            cfg.hidden_size, cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
            kernel_init=INIT, rngs=rngs)

    # -- pieces ---------------------------------------------------------------

    def logits(self, x):
        x = self.norm(x)
        out = self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)
        return out.astype(jnp.float32)

    def first_layer(self) -> DecoderLayer:
        """Layer 0 (for its static settings; stacked storage gives the stacked module)."""
        return self.layers[0] if self.layer_storage == "per_layer" else self.layers

    def _scan_layers(self, body, carry):
        """body(carry, layer, index) -> (carry, y) over the layers in order:
        (final carry, the y's stacked on a leading layer axis)."""
        if self.layer_storage == "per_layer":
            ys = []
            for index, layer in enumerate(self.layers):
                carry, y = body(carry, layer, index)
                ys.append(y)
            return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys) if ys[0] is not None else None
        graphdef, stacked = nnx.split(self.layers)
        index = jnp.arange(self.cfg.num_hidden_layers, dtype=jnp.int32)
        return lax.scan(lambda c, xs: body(c, nnx.merge(graphdef, xs[0]), xs[1]), carry, (stacked, index))

    def _forward(self, tokens, positions, mesh, cp_mesh=None):
        """Causal pass over tokens [B, S]: hidden states [B, S, d] and the
        keys/values of every layer, each [L, B, S, Hkv, D]. On a mesh with a
        "model" axis each layer's attention is `tp_attention_block` where
        `uses_tp_block` allows (decode keeps the plain all-reduce). With
        cp_mesh (axis "cp"), tokens and positions are in zig-zag order
        (`to_zigzag`) and each layer's attention is the context-parallel ring
        or all-gather over "cp"."""
        x = sharding.constrain(self.embed_tokens(tokens), mesh, sharding.ACTIVATIONS)
        x = sharding.constrain(x, cp_mesh, sharding.CP_ACTIVATIONS)

        def body(x, layer, _):
            attn = layer.self_attn
            if cp_mesh is not None:
                q, k, v = attn.project(layer.input_layernorm(x), positions)
                window = None if attn.sliding_window is None else masks.SlidingWindow(attn.sliding_window - 1, 0)
                out = context_parallel_attention(q, k, v, mesh=cp_mesh, axis="cp", causal=True, mask=window,
                                                 softmax_scale=attn.softmax_scale, input_order="zigzag",
                                                 backend=attn.backend)
                x = x + attn.out(out)
            elif uses_tp_block(attn, mesh):
                y, k, v = tp_attention(attn, layer.input_layernorm(x), positions, mesh)
                x = x + y.astype(x.dtype)
            else:
                q, k, v = attn.project(layer.input_layernorm(x), positions)
                q = sharding.constrain(q, mesh, sharding.heads_spec(attn.num_heads, mesh))
                k, v = (sharding.constrain(t, mesh, sharding.heads_spec(attn.num_kv_heads, mesh)) for t in (k, v))
                x = x + attn.out(attn.attend(q, k, v, causal=True))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            x = sharding.constrain(sharding.constrain(x, mesh, sharding.ACTIVATIONS), cp_mesh, sharding.CP_ACTIVATIONS)
            return x, (k, v)

        return self._scan_layers(body, x)

    # -- public ---------------------------------------------------------------

    def __call__(self, tokens, positions=None, *, mesh=None):
        """Full causal forward, no cache: tokens [B, S] int -> logits [B, S, V]."""
        tokens = jnp.asarray(tokens, jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        x, _ = self._forward(tokens, positions, mesh)
        return self.logits(x)

    def prefill(self, tokens, lengths, max_len: int, *, mesh=None, cp_mesh=None):
        """Right-padded prompts tokens [B, P] with lengths [B] -> (logits of
        each row's last prompt token [B, V], k_cache, v_cache [B, L, max_len,
        Hkv, D] holding the prompts' keys/values at [0, P)).

        cp_mesh: a Mesh with axis "cp" (sharding.make_cp_mesh) to split the
        sequence over its N devices (context parallelism): the prompt is
        padded to a multiple of 2N (the pad comes after every real token, so
        causal attention keeps real rows exact), put in zig-zag order once,
        and put back in natural order before the last token is picked and
        the keys/values are written to the cache."""
        batch, prompt_len = tokens.shape
        if max_len < prompt_len:
            raise ValueError(f"max_len ({max_len}) must be >= the prompt length ({prompt_len})")
        if cp_mesh is not None and mesh is not None:
            raise ValueError("mesh and cp_mesh cannot be combined: pass one of them")
        tokens = jnp.asarray(tokens, jnp.int32)
        cp = 1 if cp_mesh is None else sharding.axis_size(cp_mesh, "cp")
        seq_len = -(-prompt_len // (2 * cp)) * 2 * cp if cp_mesh is not None else prompt_len
        tokens = jnp.pad(tokens, ((0, 0), (0, seq_len - prompt_len)))
        positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), tokens.shape)
        if cp_mesh is not None:
            tokens, positions = to_zigzag(tokens, cp), to_zigzag(positions, cp)
        x, (keys, values) = self._forward(tokens, positions, mesh, cp_mesh)
        if cp_mesh is not None:
            x, keys, values = from_zigzag(x, cp), from_zigzag(keys, cp, axis=2), from_zigzag(values, cp, axis=2)
            keys, values = keys[:, :, :prompt_len], values[:, :, :prompt_len]
        last = jnp.take_along_axis(x, (jnp.asarray(lengths, jnp.int32) - 1)[:, None, None], axis=1)[:, 0]

        def to_cache(kv):  # [L, B, P, Hkv, D] -> [B, L, max_len, Hkv, D]
            kv = jnp.pad(jnp.swapaxes(kv, 0, 1), ((0, 0), (0, 0), (0, max_len - prompt_len), (0, 0), (0, 0)))
            kv = sharding.constrain(kv, cp_mesh, sharding.REPLICATED)
            return sharding.constrain(kv, mesh, sharding.cache_spec(self.cfg, mesh))

        return self.logits(last), to_cache(keys), to_cache(values)

    def init_cache(self, batch: int, max_len: int, dtype=None):
        """Zero k_cache, v_cache [B, L, max_len, Hkv, D]."""
        cfg = self.cfg
        shape = (batch, cfg.num_hidden_layers, max_len, cfg.num_key_value_heads, cfg.head_dim)
        dtype = self.dtype if dtype is None else dtype
        return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)

    def decode_step(self, tokens, k_cache, v_cache, lengths, *, mesh=None):
        """One token per row, tokens [B], at positions lengths [B] (the count
        of cached tokens before it): stores its keys/values and returns
        (logits [B, V], k_cache, v_cache)."""
        lengths = jnp.asarray(lengths, jnp.int32)
        x = sharding.constrain(self.embed_tokens(jnp.asarray(tokens, jnp.int32)), mesh, sharding.TOKEN_ACTIVATIONS)
        cache_spec = sharding.cache_spec(self.cfg, mesh)

        def body(carry, layer, index):
            x, k_cache, v_cache = carry
            attn = layer.self_attn
            q, k, v = attn.project(layer.input_layernorm(x)[:, None], lengths[:, None])
            k_cache = sharding.constrain(write_token(k_cache, index, k[:, 0], lengths), mesh, cache_spec)
            v_cache = sharding.constrain(write_token(v_cache, index, v[:, 0], lengths), mesh, cache_spec)
            out = attend_layer_cache(attn, q[:, 0], k_cache, v_cache, index, lengths + 1, mesh)
            x = x + attn.out(out)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            return (sharding.constrain(x, mesh, sharding.TOKEN_ACTIVATIONS), k_cache, v_cache), None

        (x, k_cache, v_cache), _ = self._scan_layers(body, (x, k_cache, v_cache))
        return self.logits(x), k_cache, v_cache


def with_layer_storage(model: Llama, layer_storage: str) -> Llama:
    """The same model (same weights, attention, dtypes) with its decoder
    layers stored as `layer_storage` ("stacked" or "per_layer"). The new
    model's arrays are new buffers: drop the old model to free its memory."""
    if layer_storage not in LAYER_STORAGE:
        raise ValueError(f"layer_storage must be one of {LAYER_STORAGE}, got {layer_storage!r}")
    if layer_storage == model.layer_storage:
        return model
    cfg = model.cfg
    param_dtype = model.embed_tokens.embedding[...].dtype
    abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), attention=model.attention, backend=model.backend,
                                            dtype=model.dtype, param_dtype=param_dtype, layer_storage=layer_storage))
    graphdef, state = nnx.split(abstract)
    values = nnx.to_pure_dict(nnx.state(model))
    layers = values["layers"]
    if layer_storage == "per_layer":
        values["layers"] = {i: jax.tree.map(lambda a, i=i: a[i], layers) for i in range(cfg.num_hidden_layers)}
    else:
        values["layers"] = jax.tree.map(lambda *a: jnp.stack(a), *(layers[i] for i in range(cfg.num_hidden_layers)))
    nnx.replace_by_pure_dict(state, values)
    return nnx.merge(graphdef, state)
