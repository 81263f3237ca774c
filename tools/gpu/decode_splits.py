"""Key-split count of the CUDA decode kernels: the tensor-core kernel at
several split counts per decode case, both kernels at the count
jax_fastattn.decode.decode_num_splits picks, and cuDNN's decode through
jax.nn.dot_product_attention, timed round-robin in one process by
jax_fastattn.bench.timing. It is the evidence behind decode_num_splits.

    PYTHONPATH=. python tools/gpu/decode_splits.py --out $OUT/decode_splits.json
"""
from __future__ import annotations

import argparse
import json
import math

import jax
import jax.numpy as jnp

from jax_fastattn import ffi, sharding
from jax_fastattn.bench.timing import GPU_CALLS_PER_SAMPLE, interleaved_samples
from jax_fastattn.decode import decode_num_splits

# (batch, keys) and the tensor-core kernel's split counts to time.
CASES = {"b1_s128k": (1, 131072, (17, 24, 32, 33, 48, 66, 132)),
         "b8_s32k": (8, 32768, (3, 4, 5, 8, 9, 17)),
         "b32_s8k": (32, 8192, (1, 2, 3, 5))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    q_heads, kv_heads, head_dim = 32, 8, 128
    scale = 1.0 / math.sqrt(head_dim)
    wait = lambda outs: [o.block_until_ready() for o in outs]  # noqa: E731
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "cases": []}
    for name in args.cases.split(","):
        batch, seq, mma_splits = CASES[name]
        keys = jax.random.split(jax.random.PRNGKey(0), 3)
        q = jax.random.normal(keys[0], (batch, q_heads, head_dim), jnp.bfloat16)
        k = jax.random.normal(keys[1], (batch, seq, kv_heads, head_dim), jnp.bfloat16)
        v = jax.random.normal(keys[2], (batch, seq, kv_heads, head_dim), jnp.bfloat16)
        lengths = jnp.full((batch,), seq, jnp.int32)
        table = ffi.absent(jnp.int32)
        impls, meta = {}, {}
        runs = [("mma_sync", n, False) for n in mma_splits]
        for kernel in ("mma_sync", "simt"):
            runs.append((kernel, decode_num_splits(batch, kv_heads, q_heads // kv_heads, seq, kernel, head_dim), True))
        for kernel, splits, chosen in runs:
            label = f"{kernel}/{splits}" + ("/chosen" if chosen else "")
            call = sharding.decode_call("cuda", scale, False, splits, "auto", kernel)
            fn = jax.jit(lambda q, k, v, n, t, call=call: call(q, k, v, n, t)[0])
            fn(q, k, v, lengths, table).block_until_ready()
            impls[label] = (lambda fn=fn: fn(q, k, v, lengths, table), wait)
            meta[label] = dict(kernel=kernel, splits=splits, chosen=chosen)
        cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q[:, None], k, v, implementation="cudnn")[:, 0])
        cudnn(q, k, v).block_until_ready()
        impls["cudnn"] = (lambda: cudnn(q, k, v), wait)
        meta["cudnn"] = dict(kernel="cudnn", splits=0, chosen=False)
        times, _ = interleaved_samples(impls, args.repeats, GPU_CALLS_PER_SAMPLE)
        kv_bytes = 2 * batch * seq * kv_heads * head_dim * 2
        for label, samples in times.items():
            median = sorted(samples)[len(samples) // 2]
            row = dict(case=name, **meta[label], median_s=median, kv_gbps=kv_bytes / median / 1e9, times_s=samples)
            results["cases"].append(row)
            print(f"{name:9s} {meta[label]['kernel']:8s} splits {meta[label]['splits']:4d}"
                  f"{' (chosen)' if meta[label]['chosen'] else '         '}  {median * 1e3:.3f} ms  "
                  f"{row['kv_gbps']:.0f} GB/s", flush=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
