"""One Volta-kernel workload, for ncu, compute-sanitizer and layout timing:
    python tools/gpu/volta_case.py --batch 4 --seq 2048 --heads 16 --dim 64 --repeat 20
Prints the shared-memory layout (--layout), median milliseconds and TFLOP/s."""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_fastattn import flash_attention
from jax_fastattn.config import VOLTA_LAYOUTS, KernelConfig

parser = argparse.ArgumentParser()
parser.add_argument("--batch", type=int, default=4)
parser.add_argument("--seq", type=int, default=2048)
parser.add_argument("--heads", type=int, default=16)
parser.add_argument("--dim", type=int, default=64)
parser.add_argument("--causal", action="store_true")
parser.add_argument("--repeat", type=int, default=20)
parser.add_argument("--layout", choices=VOLTA_LAYOUTS, default="swizzled")
args = parser.parse_args()
keys = jax.random.split(jax.random.PRNGKey(0), 3)
shape = (args.batch, args.seq, args.heads, args.dim)
q, k, v = (jax.random.normal(key, shape, jnp.float16) for key in keys)
fn = jax.jit(lambda q, k, v: flash_attention(q, k, v, causal=args.causal, backend="volta",
                                             config=KernelConfig(volta_layout=args.layout)))
fn(q, k, v).block_until_ready()
times = []
for _ in range(args.repeat):
    start = time.perf_counter()
    fn(q, k, v).block_until_ready()
    times.append(time.perf_counter() - start)
median = float(np.median(times))
flops = 4 * args.batch * args.heads * args.seq * args.seq * args.dim * (0.5 if args.causal else 1.0)
print(f"layout={args.layout} shape={shape} causal={args.causal} "
      f"median_ms={median * 1e3:.3f} tflops={flops / median / 1e12:.2f}")
