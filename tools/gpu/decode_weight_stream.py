"""How fast can one decode step stream a Llama's weights, and does the layer
loop's form change it? Batch-1 GEMV chains over every layer's weights (no
attention, no cache), bf16, timed as a jitted loop of `--steps` steps:

  scan      weights stacked [L, ...] and the layers run by lax.scan, as
            models.llama runs them (each step slices layer l's weights);
  unrolled  one separate buffer per layer and a Python loop over layers
            (no slicing inside the program), q/k/v and gate/up each fused
            into one matrix;
  split     as unrolled, but with the seven matrices of Hugging Face's
            layout (q, k, v, o, gate, up, down), as models.llama keeps them;
  copy      a device copy of the same bytes (read + write), the bandwidth
            reference.

Per form: ms per step and weight bytes / step time (GB/s). If scan streams
markedly slower than unrolled, the model's decode should keep per-layer
buffers. `--config tiny` is a CPU dry run.

    python tools/gpu/decode_weight_stream.py --out $OUT/decode_weight_stream.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from models.llama import runtime  # noqa: E402
from models.llama.config import LlamaConfig  # noqa: E402


def layer_shapes(cfg: LlamaConfig):
    """The weight matrices one decoder layer multiplies by, [in, out]."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    return {"qkv": (d, q + 2 * kv), "o": (q, d), "gate_up": (d, 2 * f), "down": (f, d)}


def split_shapes(cfg: LlamaConfig):
    """The same matrices in Hugging Face's layout: q, k, v, gate, up apart."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    return {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, f), "up": (d, f), "down": (f, d)}


def norm(t):
    return t * lax.rsqrt(jnp.mean(jnp.square(t.astype(jnp.float32)), -1, keepdims=True) + 1e-5).astype(t.dtype)


def layer(x, w):
    """One layer's GEMVs with the nonlinearity between them that keeps XLA
    from merging them (RMS-normalised residual stream, SwiGLU)."""
    qkv = norm(x) @ w["qkv"]
    x = x + qkv[:, : w["o"].shape[0]] @ w["o"]
    gate, up = jnp.split(norm(x) @ w["gate_up"], 2, axis=-1)
    return x + (jax.nn.silu(gate) * up) @ w["down"]


def split_layer(x, w):
    """`layer` with q, k, v and gate, up as separate matrices."""
    h = norm(x)
    q, k, v = h @ w["q"], h @ w["k"], h @ w["v"]
    x = x + (q + jnp.tile(k + v, q.shape[-1] // k.shape[-1])) @ w["o"]
    h = norm(x)
    return x + (jax.nn.silu(h @ w["gate"]) * (h @ w["up"])) @ w["down"]


def make_weights(cfg, dtype, stacked: bool, shapes=None):
    shapes = shapes or layer_shapes(cfg)
    key = jax.random.key(0)
    scale = 0.02
    if stacked:
        return {n: scale * jax.random.normal(jax.random.fold_in(key, i), (cfg.num_hidden_layers, *s), dtype)
                for i, (n, s) in enumerate(shapes.items())}
    return [{n: scale * jax.random.normal(jax.random.fold_in(key, 100 * l + i), s, dtype)
             for i, (n, s) in enumerate(shapes.items())} for l in range(cfg.num_hidden_layers)]


def step_scan(x, weights):
    return lax.scan(lambda h, w: (layer(h, w), None), x, weights)[0]


def step_unrolled(x, weights):
    for w in weights:
        x = layer(x, w)
    return x


def step_split(x, weights):
    for w in weights:
        x = split_layer(x, w)
    return x


def timed_loop(step, x, weights, steps: int, repeats: int = 3):
    run = jax.jit(lambda x, w: lax.fori_loop(0, steps, lambda _, h: step(h, w), x))
    jax.block_until_ready(run(x, weights))
    best = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run(x, weights))
        best.append((time.perf_counter() - start) / steps)
    return sorted(best)[len(best) // 2]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="llama3-8b")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    cfg = LlamaConfig.preset(args.config)
    dtype = jnp.bfloat16
    x = jnp.ones((1, cfg.hidden_size), dtype)
    nbytes = cfg.num_hidden_layers * sum(a * b for a, b in layer_shapes(cfg).values()) * 2
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "config": args.config,
               "weight_bytes_per_step": nbytes, "steps": args.steps, "forms": {}}
    for form, step, stacked, shapes in (("scan", step_scan, True, None), ("unrolled", step_unrolled, False, None),
                                        ("split", step_split, False, split_shapes(cfg))):
        weights = make_weights(cfg, dtype, stacked, shapes)
        seconds = timed_loop(step, x, weights, args.steps)
        results["forms"][form] = {"ms_per_step": 1e3 * seconds, "gb_per_s": nbytes / seconds / 1e9}
        del weights
    bandwidth = runtime.copy_bandwidth(nbytes)  # bytes read + written per second
    results["forms"]["copy"] = {"ms": 1e3 * 2 * nbytes / bandwidth, "gb_per_s": bandwidth / 1e9}
    for form, row in results["forms"].items():
        print(f"{form:>9}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()))
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
