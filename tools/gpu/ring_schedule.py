"""Compile ring attention (context_parallel_attention, strategy "ring") for
N H100s without them (deviceless, as tools/gpu/tp_schedule.py) and read the
schedule XLA chose: each K/V (and dK/dV) collective-permute start/done pair
and the heavy ops (attention kernels or loops, GEMMs) scheduled between.

A ring hides its transfers when each step's transfer runs while a step
computes. --check exits 1 unless every forward transfer has a heavy op
between its start and done, and so does every backward transfer but the
last (the dK/dV accumulators sent home after all compute).

    python tools/gpu/ring_schedule.py --out ring_schedule.json --check
    python tools/gpu/ring_schedule.py --attention-backend xla --out s.json   # without our CUDA build
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
from tp_schedule import deviceless_devices, parse_schedule  # noqa: E402

SHAPE = dict(seq_len=65536, heads=32, kv_heads=32, head_dim=128)   # 8K tokens per device at N = 8


def compile_ring(num_devices: int, mode: str, attention_backend: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jax_fastattn.parallel import context_parallel_attention

    mesh = Mesh(np.array(deviceless_devices(num_devices)), ("cp",))
    spec = NamedSharding(mesh, P(None, "cp"))
    q = jax.ShapeDtypeStruct((1, SHAPE["seq_len"], SHAPE["heads"], SHAPE["head_dim"]), jnp.bfloat16, sharding=spec)
    kv = jax.ShapeDtypeStruct((1, SHAPE["seq_len"], SHAPE["kv_heads"], SHAPE["head_dim"]), jnp.bfloat16,
                              sharding=spec)

    def attend(q, k, v):
        return context_parallel_attention(q, k, v, mesh=mesh, axis="cp", causal=True, strategy="ring",
                                          input_order="zigzag", backend=attention_backend)

    if mode == "fwd":
        fn = jax.jit(attend)
    else:
        fn = jax.jit(jax.grad(lambda q, k, v: attend(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
    schedule = parse_schedule(fn.lower(q, kv, kv).compile().as_text(), "collective-permute")
    heavy = [p["heavy_between"] for p in schedule["pairs"]]
    return {"num_devices": num_devices, "mode": mode, "transfers": len(heavy), "heavy_between": heavy,
            "hidden": sum(1 for h in heavy if h > 0), "excerpt": schedule["excerpt"][:60]}


def verdict(row: dict) -> str:
    exposed = row["transfers"] - row["hidden"]
    allowed = 0 if row["mode"] == "fwd" else 1   # the backward's last: dK/dV sent home after all compute
    return "ok" if row["transfers"] and exposed <= allowed else f"{exposed} of {row['transfers']} transfers exposed"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(compile_ring(int(args.child[0]), args.child[1], args.attention_backend)))
        return 0
    # The plugin's version check needs cuDNN, which a deviceless compile does not use.
    env = {**os.environ, "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1"}
    rows = []
    for n in args.devices:
        for mode in ("fwd", "fwd_bwd"):
            run = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", str(n), mode,
                                  "--attention-backend", args.attention_backend, "--out", args.out],
                                 capture_output=True, text=True, timeout=600, env=env)
            lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
            row = json.loads(lines[-1]) if lines else {"num_devices": n, "mode": mode, "error": run.stderr[-1500:]}
            row["verdict"] = verdict(row) if "error" not in row else "error"
            rows.append(row)
            print(f"N={n} {mode:8s} transfers {row.get('transfers')}, heavy ops between start/done "
                  f"{row.get('heavy_between')}: {row['verdict']}", flush=True)
    with open(args.out, "w") as f:
        json.dump({"shape": SHAPE, "attention_backend": args.attention_backend, "rows": rows}, f, indent=1)
    return 0 if not args.check or all(r["verdict"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
