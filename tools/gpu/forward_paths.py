"""Compares the two CUDA forward kernels (wgmma on sm_90a, mma.sync) with
the reference on one GPU: python tools/gpu/forward_paths.py

Prints the max error of out and lse for each case and kernel. The
"one-hot V" cases make out equal to the softmax P itself (V = identity), so
a wrong S or P shows there, and a wrong V operand only in the other cases.
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jax_fastattn import flash_attention, masks
from jax_fastattn.config import KernelConfig
from jax_fastattn.reference import attention_reference

CASES = [  # batch, q_len, kv_len, q_heads, kv_heads, dim, causal, dtype
    (1, 128, 128, 1, 1, 128, False, jnp.bfloat16),
    (1, 128, 128, 1, 1, 64, False, jnp.bfloat16),
    (2, 300, 300, 4, 2, 128, True, jnp.bfloat16),
    (2, 300, 257, 4, 4, 64, False, jnp.float16),
    (1, 1000, 1000, 8, 1, 128, True, jnp.float16),
    (1, 77, 1500, 2, 2, 64, True, jnp.bfloat16),
    (3, 129, 65, 2, 1, 128, False, jnp.bfloat16),
]


def run(q, k, v, causal, kernel):
    out, lse = flash_attention(q, k, v, causal=causal, return_lse=True, backend="cuda",
                               config=KernelConfig(cuda_forward=kernel))
    return np.asarray(out, np.float32), np.asarray(lse)


def main():
    worst = 0.0
    for b, sq, skv, hq, hkv, d, causal, dtype in CASES:
        keys = jax.random.split(jax.random.PRNGKey(sq + d), 3)
        q = jax.random.normal(keys[0], (b, sq, hq, d), dtype)
        k = jax.random.normal(keys[1], (b, skv, hkv, d), dtype)
        for name, v in (("random V", jax.random.normal(keys[2], (b, skv, hkv, d), dtype)),
                        ("one-hot V", jnp.broadcast_to(jnp.eye(skv, d, dtype=dtype)[None, :, None],
                                                       (b, skv, hkv, d)))):
            plan = masks.make_plan(None, causal, b, hq, sq, skv)
            ref_out, ref_lse = attention_reference(
                *(x.astype(jnp.float32) for x in (q, k, v)), plan, None, 1 / np.sqrt(d))
            ref_out, ref_lse = np.asarray(ref_out), np.asarray(ref_lse)
            for kernel in ("auto", "mma_sync"):
                out, lse = run(q, k, v, causal, kernel)
                e_out = float(np.nanmax(np.abs(out - ref_out))) if np.all(np.isfinite(out)) else float("inf")
                e_lse = float(np.max(np.abs(np.where(np.isfinite(ref_lse), lse - ref_lse, 0))))
                if kernel == "auto":
                    worst = max(worst, e_out)
                print(f"B{b} Sq{sq} Skv{skv} H{hq}/{hkv} D{d} causal={causal} {jnp.dtype(dtype).name} "
                      f"{name:9s} {kernel:8s}: out err {e_out:.4f}  lse err {e_lse:.4f}", flush=True)
    print("worst wgmma out err", worst)
    return 0 if worst < 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
