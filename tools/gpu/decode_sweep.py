"""Times the CUDA decode kernel in-process for a few split targets (a tuning
aid for the device machine; prints one line per setting)."""
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_fastattn import decode, decode_attention


def time_decode(batch, seq, targets, calls=10, samples=15):
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (batch, 32, 128), jnp.bfloat16)
    k = jax.random.normal(keys[1], (batch, seq, 8, 128), jnp.bfloat16)
    v = jax.random.normal(keys[2], (batch, seq, 8, 128), jnp.bfloat16)
    n = jnp.full((batch,), seq, jnp.int32)
    for target in targets:
        decode._TARGET_CTAS = target
        fn = jax.jit(lambda q, k, v, n: decode_attention(q, k, v, n, backend="cuda"))
        jax.block_until_ready(fn(q, k, v, n))
        times = []
        for _ in range(samples):
            start = time.perf_counter()
            jax.block_until_ready([fn(q, k, v, n) for _ in range(calls)])
            times.append((time.perf_counter() - start) / calls)
        median = float(np.median(times))
        print(f"{sys.argv[1] if len(sys.argv) > 1 else ''} B={batch} S={seq} target_ctas={target}: "
              f"{median * 1e3:.3f} ms {2 * k.nbytes / median / 1e9:.0f} GB/s", flush=True)


time_decode(8, 32768, [4 * 132, 8 * 132, 16 * 132])
time_decode(1, 131072, [4 * 132, 8 * 132, 16 * 132])
