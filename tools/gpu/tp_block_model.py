"""Model of the tiling-AllReduce speedup: per-chunk compute measured on one
GPU, all-reduce time from NVLink bandwidth, block time predicted for
num_chunks 1..8 (jax_fastattn.parallel.tiling_cost.pipeline_time).

For each config, tensor-parallel degree N and sequence length, one GPU runs
what one of N devices runs: the K/V projection of the whole sequence for its
Hkv/N heads, then per chunk (equal-work causal chunks, tiling_cost.chunk_bounds)
the Q projection of its Hq/N heads, causal attention against the key prefix
(flash_attention, backend "auto") and the output projection by its rows of
wo. The all-reduce of a chunk's [1, rows, d_model] bf16 partial sums is not
run (one GPU): its time is the ring formula 2(N-1)/N * bytes / bandwidth
plus a latency (tiling_cost.allreduce_time). The predicted block time is a
MODEL: it leaves out the compute slowdown from NCCL kernels sharing SMs.

    python tools/gpu/tp_block_model.py --out $OUT/tp_block_model.json        # H200, ~3 min
    python tools/gpu/tp_block_model.py --preset tiny --out /tmp/m.json        # CPU dry run

Work is ordered num_chunks 1, 2, 4, 8, then 3, 5, 6, 7 across all configs;
what does not fit in --budget-s is skipped and listed in the JSON.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from jax_fastattn import flash_attention  # noqa: E402
from jax_fastattn.parallel import tiling_cost  # noqa: E402

CONFIGS = {
    # Llama-2-7B: MHA (Touvron et al. 2023, Table 1 / HF config).
    "llama2-7b": dict(d_model=4096, heads=32, kv_heads=32, head_dim=128, layers=32),
    # Pangu-38B-shaped (FastAttention's end-to-end model): 48 layers,
    # d_model 7168, 56 heads, GQA with 8 kv heads, D=128.
    "38b-gqa8": dict(d_model=7168, heads=56, kv_heads=8, head_dim=128, layers=48),
    "tiny": dict(d_model=64, heads=8, kv_heads=8, head_dim=16, layers=2),
}
PRESETS = {
    "full": dict(configs=["llama2-7b", "38b-gqa8"], tp=[2, 4, 8], seq=[8192, 32768], dtype="bfloat16", reps=5),
    "tiny": dict(configs=["tiny"], tp=[2, 4], seq=[256], dtype="float32", reps=2),
}
CHUNK_ORDER = [1, 2, 4, 8, 3, 5, 6, 7]
# NVLink 4 on H100/H200: 900 GB/s bidirectional per GPU (NVIDIA datasheets).
LINKS = {"nvlink_450GBps_per_direction": 450e9, "nvlink_900GBps": 900e9}


def timed(fn, *args, reps: int) -> float:
    """Seconds per call: after one warm-up call (which compiles), the median
    over 3 rounds of `reps` calls issued back to back and waited for once, so
    that host dispatch overlaps the device work as it would inside one
    program."""
    jax.block_until_ready(fn(*args))
    rounds = []
    for _ in range(3):
        begin = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        rounds.append((time.perf_counter() - begin) / reps)
    return float(np.median(rounds))


@functools.partial(jax.jit, static_argnames=("heads", "head_dim"))
def chunk_compute(x_chunk, k_prefix, v_prefix, wq, wo, *, heads, head_dim):
    """One device's compute for one chunk: Q projection, causal attention
    against the key prefix (bottom-right aligned), output projection."""
    batch, rows, _ = x_chunk.shape
    q = (x_chunk @ wq).reshape(batch, rows, heads, head_dim)
    attended = flash_attention(q, k_prefix, v_prefix, causal=True)
    return attended.reshape(batch, rows, heads * head_dim) @ wo


@jax.jit
def kv_projection(x, wk, wv):
    return x @ wk, x @ wv


class Case:
    """One (config, N, S): the local shard's arrays and measured chunk times."""

    def __init__(self, config_name, tp, seq_len, dtype, key):
        cfg = CONFIGS[config_name]
        self.name, self.tp, self.seq_len, self.cfg = config_name, tp, seq_len, cfg
        self.local_heads, self.local_kv = cfg["heads"] // tp, cfg["kv_heads"] // tp
        d, dim = cfg["d_model"], cfg["head_dim"]
        keys = jax.random.split(key, 5)
        init = lambda k, shape: (jax.random.normal(k, shape, jnp.float32) * shape[0] ** -0.5).astype(dtype)  # noqa
        self.x = init(keys[0], (1, seq_len, d))
        self.wq = init(keys[1], (d, self.local_heads * dim))
        self.wk = init(keys[2], (d, self.local_kv * dim))
        self.wv = init(keys[3], (d, self.local_kv * dim))
        self.wo = init(keys[4], (self.local_heads * dim, d))
        self.chunk_times = {}  # (start, end) -> s
        self.kv_time = None
        self.k = self.v = None

    def measure_kv(self, reps):
        self.kv_time = timed(kv_projection, self.x, self.wk, self.wv, reps=reps)
        k, v = kv_projection(self.x, self.wk, self.wv)
        shape = (1, self.seq_len, self.local_kv, self.cfg["head_dim"])
        self.k, self.v = k.reshape(shape), v.reshape(shape)

    def bounds(self, num_chunks):
        return tiling_cost.chunk_bounds(self.seq_len, num_chunks, True, self.cfg["d_model"], self.local_heads,
                                        self.cfg["head_dim"])

    def measure_chunks(self, num_chunks, reps):
        for start, end in self.bounds(num_chunks):
            if (start, end) not in self.chunk_times:
                fn = functools.partial(chunk_compute, heads=self.local_heads, head_dim=self.cfg["head_dim"])
                self.chunk_times[(start, end)] = timed(
                    fn, self.x[:, start:end], self.k[:, :end], self.v[:, :end], self.wq, self.wo, reps=reps)

    def predict(self, num_chunks, link_bytes_per_s, bytes_per_element):
        model = dataclass_replace(tiling_cost.TPCostModel.for_platform("gpu"), link_bytes_per_s=link_bytes_per_s)
        bounds = self.bounds(num_chunks)
        compute = [self.chunk_times[b] for b in bounds]
        comm = [tiling_cost.allreduce_time((e - s) * self.cfg["d_model"] * bytes_per_element, self.tp, model)
                for s, e in bounds]
        timing = tiling_cost.pipeline_time(self.kv_time, compute, comm)
        timing.update(chunk_compute_s=compute, chunk_allreduce_s=comm, bounds=bounds)
        return timing


def dataclass_replace(obj, **changes):
    import dataclasses
    return dataclasses.replace(obj, **changes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--budget-s", type=float, default=150.0, help="stop starting new measurements after this")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    dtype = jnp.dtype(preset["dtype"])
    began = time.perf_counter()
    device = jax.devices()[0]
    cases, failures, skipped = [], [], []
    for c, name in enumerate(preset["configs"]):
        for tp in preset["tp"]:
            for seq_len in preset["seq"]:
                try:
                    case = Case(name, tp, seq_len, dtype, jax.random.PRNGKey(c * 100 + tp * 10 + seq_len % 7))
                    case.measure_kv(preset["reps"])
                    cases.append(case)
                except Exception as error:  # noqa: BLE001 - record (OOM etc.), go on
                    failures.append({"config": name, "tp": tp, "seq_len": seq_len, "stage": "kv",
                                     "error": f"{type(error).__name__}: {str(error)[:300]}"})
    done = {id(case): [] for case in cases}
    for num_chunks in CHUNK_ORDER:
        for case in cases:
            if time.perf_counter() - began > args.budget_s:
                skipped.append({"config": case.name, "tp": case.tp, "seq_len": case.seq_len,
                                "num_chunks": num_chunks})
                continue
            try:
                case.measure_chunks(num_chunks, preset["reps"])
                done[id(case)].append(num_chunks)
            except Exception as error:  # noqa: BLE001
                failures.append({"config": case.name, "tp": case.tp, "seq_len": case.seq_len,
                                 "num_chunks": num_chunks, "error": f"{type(error).__name__}: {str(error)[:300]}"})

    rows = []
    for case in cases:
        for link_name, link in LINKS.items():
            baseline = None
            for num_chunks in sorted(done[id(case)]):
                timing = case.predict(num_chunks, link, dtype.itemsize)
                baseline = baseline or timing["total"]
                rows.append({"config": case.name, "tp": case.tp, "seq_len": case.seq_len, "link": link_name,
                             "num_chunks": num_chunks, "kv_projection_s": case.kv_time,
                             "predicted_block_s": timing["total"], "compute_s": timing["compute"],
                             "exposed_allreduce_s": timing["exposed_comm"],
                             "speedup_vs_1_chunk": baseline / timing["total"],
                             "chunk_compute_s": timing["chunk_compute_s"],
                             "chunk_allreduce_s": timing["chunk_allreduce_s"],
                             "bounds": timing["bounds"]})
    report = {"kind": "model: measured per-chunk compute on one device + all-reduce time from link bandwidth",
              "device": str(device.device_kind), "platform": device.platform, "jax": jax.__version__,
              "dtype": str(dtype), "batch": 1, "preset": args.preset, "configs": {n: CONFIGS[n] for n in
                                                                               preset["configs"]},
              "cost_model": dataclass_replace(tiling_cost.TPCostModel.for_platform("gpu")).__dict__,
              "links_bytes_per_s": LINKS, "rows": rows, "failures": failures, "skipped": skipped,
              "wall_s": time.perf_counter() - began}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)

    print(f"MODEL on {device.device_kind}: block time (ms) by num_chunks; link 450 GB/s per direction")
    print(f"{'config':>10} {'TP':>2} {'S':>6} {'1-chunk':>8} {'best':>8} {'n':>2} {'speedup':>7}  by n")
    for case in cases:
        mine = [r for r in rows if r["config"] == case.name and r["tp"] == case.tp and r["seq_len"] == case.seq_len
                and r["link"] == "nvlink_450GBps_per_direction"]
        if not mine:
            continue
        best = min(mine, key=lambda r: r["predicted_block_s"])
        series = " ".join(f"{r['num_chunks']}:{r['predicted_block_s'] * 1e3:.3f}" for r in mine)
        print(f"{case.name:>10} {case.tp:>2} {case.seq_len:>6} {mine[0]['predicted_block_s'] * 1e3:8.3f} "
              f"{best['predicted_block_s'] * 1e3:8.3f} {best['num_chunks']:>2} {best['speedup_vs_1_chunk']:7.2f}  "
              f"{series}")
    for failure in failures:
        print("failed:", failure)
    if skipped:
        print(f"skipped (budget): {len(skipped)} measurements")
    print(f"wall {report['wall_s']:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
