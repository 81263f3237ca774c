"""Key-split count of the CUDA decode kernels: each kernel at several split
counts (the number of CTAs the grid aims at, per decode case), and cuDNN's
decode through jax.nn.dot_product_attention, timed round-robin in one
process by jax_fastattn.bench.timing. It picks the
targets of jax_fastattn.decode.decode_num_splits.

    python tools/gpu/decode_splits.py --out $OUT/decode_splits.json
"""
from __future__ import annotations

import argparse
import json
import math

import jax
import jax.numpy as jnp

from jax_fastattn import ffi, sharding
from jax_fastattn.bench.timing import GPU_CALLS_PER_SAMPLE, interleaved_samples

CASES = {"b1_s128k": (1, 131072), "b8_s32k": (8, 32768), "b32_s8k": (32, 8192)}
TARGET_CTAS = (132, 264, 528, 1056, 2112)


def splits_for(target: int, batch: int, kv_heads: int, max_len: int) -> int:
    """Split count whose grid has about `target` CTAs (one CTA per split,
    kv head and batch row), at least 256 keys per split."""
    return max(1, min(-(-max_len // 256), -(-target // (batch * kv_heads))))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    q_heads, kv_heads, head_dim = 32, 8, 128
    scale = 1.0 / math.sqrt(head_dim)
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "cases": []}
    for name in args.cases.split(","):
        batch, seq = CASES[name]
        keys = jax.random.split(jax.random.PRNGKey(0), 3)
        q = jax.random.normal(keys[0], (batch, q_heads, head_dim), jnp.bfloat16)
        k = jax.random.normal(keys[1], (batch, seq, kv_heads, head_dim), jnp.bfloat16)
        v = jax.random.normal(keys[2], (batch, seq, kv_heads, head_dim), jnp.bfloat16)
        lengths = jnp.full((batch,), seq, jnp.int32)
        table = ffi.absent(jnp.int32)
        impls, meta = {}, {}
        for kernel in ("simt", "mma_sync"):
            for target in TARGET_CTAS:
                splits = splits_for(target, batch, kv_heads, seq)
                call = sharding.decode_call("cuda", scale, False, splits, "auto", kernel)
                fn = jax.jit(lambda q, k, v, n, t, call=call: call(q, k, v, n, t)[0])
                fn(q, k, v, lengths, table).block_until_ready()
                label = f"{kernel}/{target}"
                impls[label] = (lambda fn=fn: fn(q, k, v, lengths, table),
                                lambda outs: [o.block_until_ready() for o in outs])
                meta[label] = dict(kernel=kernel, target_ctas=target, splits=splits)
        cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q[:, None], k, v, implementation="cudnn")[:, 0])
        cudnn(q, k, v).block_until_ready()
        impls["cudnn"] = (lambda: cudnn(q, k, v), lambda outs: [o.block_until_ready() for o in outs])
        meta["cudnn"] = dict(kernel="cudnn", target_ctas=0, splits=0)
        times, _ = interleaved_samples(impls, args.repeats, GPU_CALLS_PER_SAMPLE)
        kv_bytes = 2 * batch * seq * kv_heads * head_dim * 2
        for label, samples in times.items():
            median = sorted(samples)[len(samples) // 2]
            row = dict(case=name, **meta[label], median_s=median, kv_gbps=kv_bytes / median / 1e9, times_s=samples)
            results["cases"].append(row)
            print(f"{name:9s} {meta[label]['kernel']:8s} target {meta[label]['target_ctas']:5d} "
                  f"splits {meta[label]['splits']:4d}  {median * 1e3:.3f} ms  {row['kv_gbps']:.0f} GB/s", flush=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
