"""Load Hugging Face Llama weights from local safetensors files (no download).

Names as `transformers`' LlamaForCausalLM: model.embed_tokens.weight,
model.layers.N.self_attn.{q,k,v,o}_proj.weight,
model.layers.N.mlp.{gate,up,down}_proj.weight,
model.layers.N.{input,post_attention}_layernorm.weight, model.norm.weight,
lm_head.weight (absent when tied). torch Linear weights are [out, in]; ours
are kernels [in, ...]. HF stores q/k projections for the rotate_half RoPE that
jax_fastattn.nn implements, so they load as they are.
"""
from __future__ import annotations

import glob
import os
from typing import Optional

import jax.numpy as jnp
from flax import nnx

from .config import LlamaConfig
from .model import Llama


def _read(path: str) -> dict:
    from safetensors import safe_open  # optional dependency: only the loader needs it

    files = sorted(glob.glob(os.path.join(path, "*.safetensors"))) if os.path.isdir(path) else [path]
    if not files:
        raise ValueError(f"path must be a .safetensors file or a directory holding some, found none at {path!r}")
    tensors = {}
    for name in files:
        with safe_open(name, framework="flax") as f:  # "flax" reads bfloat16, numpy cannot
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def hf_to_params(tensors: dict, cfg: LlamaConfig, dtype, layer_storage: str = "per_layer") -> dict:
    """HF name -> tensor dict into the pure-dict params of `Llama` with the
    given layer storage ("stacked": one array per parameter with a leading
    layer axis; "per_layer": {layer index: that layer's params})."""
    d, hq, hkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

    def get(name):
        if name not in tensors:
            raise ValueError(f"checkpoint has no tensor {name!r} (HF Llama names expected)")
        return jnp.asarray(tensors[name], dtype)

    def layer_params(one):
        """one(fmt, transform): the value of a per-layer tensor name format."""
        layer = "model.layers.{}."
        return {
            "input_layernorm": {"scale": one(layer + "input_layernorm.weight", lambda w: w)},
            "post_attention_layernorm": {"scale": one(layer + "post_attention_layernorm.weight", lambda w: w)},
            "self_attn": {
                "query": {"kernel": one(layer + "self_attn.q_proj.weight", lambda w: w.T.reshape(d, hq, hd))},
                "key": {"kernel": one(layer + "self_attn.k_proj.weight", lambda w: w.T.reshape(d, hkv, hd))},
                "value": {"kernel": one(layer + "self_attn.v_proj.weight", lambda w: w.T.reshape(d, hkv, hd))},
                "out": {"kernel": one(layer + "self_attn.o_proj.weight", lambda w: w.T.reshape(hq, hd, d))},
            },
            "mlp": {name: {"kernel": one(layer + f"mlp.{name}.weight", lambda w: w.T)}
                    for name in ("gate_proj", "up_proj", "down_proj")},
        }

    if layer_storage == "per_layer":
        layers = {i: layer_params(lambda fmt, transform, i=i: transform(get(fmt.format(i))))
                  for i in range(cfg.num_hidden_layers)}
    else:
        layers = layer_params(lambda fmt, transform: jnp.stack(
            [transform(get(fmt.format(i))) for i in range(cfg.num_hidden_layers)]))
    params = {
        "embed_tokens": {"embedding": get("model.embed_tokens.weight")},
        "norm": {"scale": get("model.norm.weight")},
        "layers": layers,
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": get("lm_head.weight").T}
    return params


def load_safetensors(path: str, cfg: Optional[LlamaConfig] = None, *, attention: str = "fastattn",
                     backend: str = "auto", dtype=jnp.float32, param_dtype=jnp.float32,
                     layer_storage: str = "per_layer") -> Llama:
    """A `Llama` with weights from a .safetensors file or a directory of them
    (sharded checkpoints too). cfg default: config.json beside the weights.
    layer_storage: "stacked" or "per_layer" (see models.llama.model)."""
    if cfg is None:
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        if not os.path.exists(os.path.join(folder, "config.json")):
            raise ValueError(f"cfg must be given when there is no config.json beside {path!r}")
        cfg = LlamaConfig.from_json(folder)
    abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), attention=attention, backend=backend,
                                            dtype=dtype, param_dtype=param_dtype, layer_storage=layer_storage))
    graphdef, state = nnx.split(abstract)
    params = hf_to_params(_read(path), cfg, param_dtype, layer_storage)
    expected = nnx.to_pure_dict(state)
    for key_path, value in _flat(params):
        shape = _lookup(expected, key_path).shape
        if value.shape != shape:
            raise ValueError(f"checkpoint tensor for {'.'.join(map(str, key_path))} has shape {value.shape}, the config "
                             f"needs {shape}")
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def _flat(tree, prefix=()):
    for k, v in tree.items():  # keys: names, and layer indices under per-layer storage
        if isinstance(v, dict):
            yield from _flat(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _lookup(tree, key_path):
    for k in key_path:
        tree = tree[k]
    return tree
