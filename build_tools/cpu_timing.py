"""GFLOP/s of the CPU kernel's forward (and optionally backward) pass at
each instruction-set level, for one shape:

    python -m build_tools.cpu_timing --seq 4096 --head-dim 64 --heads 8 \\
        --levels auto avx512 amx --dtypes float32 bfloat16 [--backward] [--out r.json]

Threads: the kernel's pool takes the process's CPU affinity mask, so
`taskset -c 0,1` pins it (and XLA) to two cores. FLOPs count 4·Sq·Skv·D
per head (2 matmuls) for the forward, 2.5x that for the backward (5
matmuls), halved when causal; the best of --repeats runs after a warm-up.
"cpu_gflops" divide by the process's CPU time per pool thread instead of
the wall time: the kernel's own speed on a machine shared with other work.
"""
import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_fastattn import ffi, flash_attention
from jax_fastattn.config import KernelConfig


def time_call(fn, repeats):
    """Best wall time of `repeats` calls, and the process CPU time (all
    threads) of that call divided by the pool's threads: on a machine
    shared with other work the latter is what the kernel itself took."""
    jax.block_until_ready(fn())
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - start_cpu)
    return best, best_cpu / len(os.sched_getaffinity(0))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--causal", type=int, default=1)
    parser.add_argument("--levels", nargs="+", default=["auto"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--backward", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    levels = ffi.cpu_isa_levels()
    shape = (args.batch, args.seq, args.heads, args.head_dim)
    flops = 4 * args.batch * args.heads * args.seq * args.seq * args.head_dim / (2 if args.causal else 1)
    rng = np.random.default_rng(0)
    base = [rng.standard_normal(shape, dtype=np.float32) for _ in range(3)]
    rows = []
    for level in args.levels:
        for dtype in args.dtypes:
            q, k, v = (jnp.asarray(x, dtype) for x in base)
            config = KernelConfig(cpu_isa=level)
            row = dict(level=level, dtype=dtype, shape=list(shape), causal=bool(args.causal))
            try:
                forward = jax.jit(lambda q, k, v: flash_attention(q, k, v, causal=bool(args.causal), backend="cpu",
                                                                  config=config))
                seconds, cpu_seconds = time_call(lambda: forward(q, k, v), args.repeats)
                row.update(forward_s=seconds, forward_gflops=flops / seconds / 1e9,
                           forward_cpu_gflops=flops / cpu_seconds / 1e9)
                if args.backward:
                    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(forward(q, k, v).astype(jnp.float32)),
                                            argnums=(0, 1, 2)))
                    seconds, cpu_seconds = time_call(lambda: grad(q, k, v), args.repeats)
                    # the gradient call reruns the forward: count both
                    row.update(train_step_s=seconds, train_step_gflops=3.5 * flops / seconds / 1e9,
                               train_step_cpu_gflops=3.5 * flops / cpu_seconds / 1e9)
            except Exception as error:  # one case failing must not stop the rest
                row["error"] = repr(error)[:300]
            rows.append(row)
            print(f"{level:12s} {dtype:9s} " + "  ".join(
                f"{key} {value:8.1f}" for key, value in row.items() if key.endswith("gflops")) +
                (f"  error {row['error']}" if "error" in row else ""), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(cpu_isa_levels=levels, results=rows), f, indent=1)


if __name__ == "__main__":
    main()
