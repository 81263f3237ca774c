"""Times the CUDA forward kernel's tile variants (the query tile is a plan
choice: config.CUDA_TILES) on one shape, causal and not, median of 20
samples of 10 calls: python tests/gpu/attention_tiles.py [--dim 128]."""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_fastattn.attention as attention
from jax_fastattn import flash_attention
from jax_fastattn.config import TileConfig

parser = argparse.ArgumentParser()
parser.add_argument("--dim", type=int, default=128)
parser.add_argument("--seq", type=int, default=4096)
parser.add_argument("--tokens", type=int, default=16384)
parser.add_argument("--heads", type=int, default=32)
parser.add_argument("--tile-q", type=int, nargs="+", default=[64])
args = parser.parse_args()
batch = args.tokens // args.seq
keys = jax.random.split(jax.random.PRNGKey(0), 3)
q, k, v = (jax.random.normal(key, (batch, args.seq, args.heads, args.dim), jnp.bfloat16) for key in keys)
reference = {c: flash_attention(q, k, v, causal=c, backend="xla").astype(jnp.float32) for c in (False, True)}
for tile_q in args.tile_q:
    attention.CUDA_TILES = TileConfig(tile_q, 64)
    for causal in (False, True):
        fn = jax.jit(lambda q, k, v: flash_attention(q, k, v, causal=causal, backend="cuda"))
        error = float(jnp.max(jnp.abs(fn(q, k, v).astype(jnp.float32) - reference[causal])))
        assert error < 2e-2, (tile_q, causal, error)
        times = []
        for _ in range(20):
            start = time.perf_counter()
            jax.block_until_ready([fn(q, k, v) for _ in range(10)])
            times.append((time.perf_counter() - start) / 10)
        median = float(np.median(times))
        flops = 4 * batch * args.heads * args.seq ** 2 * args.dim * (0.5 if causal else 1.0)
        print(f"tile_q={tile_q} D={args.dim} S={args.seq} causal={causal}: {median * 1e3:.3f} ms "
              f"{flops / median / 1e12:.1f} TFLOP/s")
