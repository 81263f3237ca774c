"""Per-step kernel times of ring attention on one GPU, and a model of the
context-parallel speedup built from them.

Measures, on one device, `flash_attention` forward and forward+backward for
the blocks a ring step runs (a c x c block with no mask, "full", and a
c x c causal block, "diag", c = S / 2N the zig-zag chunk), an LSE merge
(for its bandwidth: the ring's merges are modelled from the bytes they
move), and the single-device causal attention over the whole sequence
(where it fits the time budget). From these and a link bandwidth it models
the time of the zig-zag ring, the naive (contiguous) causal ring and the
all-gather variant on N devices, as parallel efficiency T1 / (N * T_N).

It is a model: transfers are assumed to overlap the compute of the step
they feed (the ring) or not at all (the all-gather); launch latency,
NCCL's use of SMs and link contention are not in it.

    python tools/gpu/ring_step_time.py --preset h200 --out ring_step_time.json
    python tools/gpu/ring_step_time.py --preset tiny --out /tmp/ring.json      # CPU dry run
    python tools/gpu/ring_step_time.py --from-json ring_step_time.json --nvlink-gbps 450
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jax_fastattn import flash_attention, merge_partials  # noqa: E402
from jax_fastattn.parallel.context import PENDING_MERGE_BYTES  # noqa: E402
from jax_fastattn.bench import timing  # noqa: E402

K = 1024
PRESETS = {
    # Llama-2-7B attention: 32 heads of 128, bf16. (N, S) pairs: 2/4/8 GPUs at
    # 128K-1M tokens, and 8 GPUs at 8K tokens per GPU (the published bar).
    "h200": dict(heads=32, kv_heads=32, head_dim=128, dtype="bfloat16", budget_s=170.0,
                 devices=(2, 4, 8), seq_lens=(128 * K, 256 * K, 512 * K, 1024 * K), extra=((8, 64 * K),),
                 single_device_max=128 * K),
    "tiny": dict(heads=2, kv_heads=2, head_dim=16, dtype="float32", budget_s=60.0,
                 devices=(2, 4), seq_lens=(256, 512), extra=((4, 128),), single_device_max=512),
}
# Published: zhuzilin/ring-flash-attention benchmark, 8xH800, 8K tokens per GPU.
PUBLISHED = {"zigzag_ring_fwd": 0.85, "zigzag_ring_fwd_bwd": 0.90, "naive_ring": (0.52, 0.54)}


def attention_flops(q_len, kv_len, heads, head_dim, causal):
    flops = 4.0 * q_len * kv_len * heads * head_dim
    return flops / 2 if causal else flops


def _timed(fn, args, seconds_hint=1.0, window_s=0.02):
    """Median time per call of fn(*args) after a compile+warm call. Calls
    shorter than `window_s` are dispatched back to back, `calls` at a time,
    with one wait per sample (timing.sample_seconds, as the ring runs them
    inside one program), so the host's dispatch and wait (tens of
    microseconds) are not counted in each sub-millisecond block or merge."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    if first >= seconds_hint:  # long blocks: one more sample would double the budget
        return first
    calls = max(1, min(50, int(window_s / max(first, 1e-6))))
    reps = max(1, min(5, int(seconds_hint / max(first * calls, 1e-4))))
    return timing.sample_seconds(lambda: fn(*args), jax.block_until_ready, reps, calls)[1]


def _inputs(length, cfg):
    dtype = jnp.dtype(cfg["dtype"])
    keys = jax.random.split(jax.random.PRNGKey(length), 4)
    q = jax.random.normal(keys[0], (1, length, cfg["heads"], cfg["head_dim"]), dtype)
    k = jax.random.normal(keys[1], (1, length, cfg["kv_heads"], cfg["head_dim"]), dtype)
    v = jax.random.normal(keys[2], (1, length, cfg["kv_heads"], cfg["head_dim"]), dtype)
    d_out = jax.random.normal(keys[3], q.shape, dtype)
    return q, k, v, d_out


def _attention_fns(causal):
    forward = jax.jit(lambda q, k, v: flash_attention(q, k, v, causal=causal, return_lse=True))

    def loss(q, k, v, d_out):
        return jnp.sum(flash_attention(q, k, v, causal=causal).astype(jnp.float32) * d_out.astype(jnp.float32))

    forward_backward = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return forward, forward_backward


def measure_attention(length, causal, cfg):
    """{fwd_s, fwd_bwd_s} of one length x length attention call."""
    q, k, v, d_out = _inputs(length, cfg)
    forward, forward_backward = _attention_fns(causal)
    return {"fwd_s": _timed(forward, (q, k, v)), "fwd_bwd_s": _timed(forward_backward, (q, k, v, d_out))}


def measure_merge(length, cfg):
    """One step's merge of a running f32 result with two block results."""
    q, _, _, _ = _inputs(length, cfg)
    acc = q.astype(jnp.float32)
    lse = jnp.zeros((1, cfg["heads"], length), jnp.float32)
    merge = jax.jit(lambda a, o1, o2, l: merge_partials([a, o1, o2], [l, l + 0.5, l - 0.5]))
    return {"merge_s": _timed(merge, (acc, q, q, lse))}


def _predicted_s(done, length, causal):
    """Time of a case predicted from the largest one done (quadratic in length)."""
    if not done:
        return 0.0
    last_len, last_s = done[-1]
    return last_s * (length / last_len) ** 2 * (0.5 if causal else 1.0)


def run_measurements(cfg):
    cases = [(n, s) for n in cfg["devices"] for s in cfg["seq_lens"]] + [tuple(x) for x in cfg["extra"]]
    chunks = sorted({s // (2 * n) for n, s in cases})
    singles = sorted({s for _, s in cases if s <= cfg["single_device_max"]})
    start = time.perf_counter()
    results = {"blocks": {}, "single_device": {}, "failures": [], "skipped": []}
    done = []   # (length, wall seconds of its full-block measurement), for the budget guard
    for c in chunks:
        entry = {}
        for kind, causal in (("full", False), ("diag", True)):
            # A large case runs 2 forward and 2 forward+backward calls (~3.5x forward) after compiling.
            if time.perf_counter() - start + 12 * _predicted_s(done, c, causal) > cfg["budget_s"]:
                results["skipped"].append(f"block {kind} c={c}: over the time budget")
                continue
            t0 = time.perf_counter()
            try:
                entry[kind] = measure_attention(c, causal, cfg)
                if kind == "full":
                    done.append((c, entry[kind]["fwd_s"]))
            except Exception as error:  # noqa: BLE001  (OOM etc.: record and go on)
                results["failures"].append(f"block {kind} c={c}: {type(error).__name__}: {error}"[:500])
            print(f"  block {kind:4s} c={c:>8d}: {entry.get(kind)} ({time.perf_counter() - t0:.1f}s)",
                  flush=True)
        try:
            entry.update(measure_merge(c, cfg))
        except Exception as error:  # noqa: BLE001
            results["failures"].append(f"merge c={c}: {type(error).__name__}: {error}"[:500])
        results["blocks"][str(c)] = entry
    for s in singles:
        if time.perf_counter() - start + 12 * _predicted_s(done, s, True) > cfg["budget_s"]:
            results["skipped"].append(f"single-device S={s}: over the time budget")
            continue
        try:
            results["single_device"][str(s)] = measure_attention(s, True, cfg)
            print(f"  single-device causal S={s}: {results['single_device'][str(s)]}", flush=True)
        except Exception as error:  # noqa: BLE001
            results["failures"].append(f"single-device S={s}: {type(error).__name__}: {error}"[:500])
    results["wall_s"] = time.perf_counter() - start
    return results, cases


# ----------------------------------------------------------------------------
# The model


def _single_device(measured, s, key, blocks_estimate):
    """T1 of a causal S x S attention: measured, else scaled quadratically from
    the largest measured length, else composed from blocks."""
    singles = {int(x): v for x, v in measured["single_device"].items() if key in v}
    if s in singles:
        return singles[s][key], "measured"
    if singles:
        largest = max(singles)
        return singles[largest][key] * (s / largest) ** 2, f"scaled from S={largest}"
    return blocks_estimate, "composed from blocks"


def merge_bytes(parts_per_step, steps: int, part_bytes: float, limit: float = PENDING_MERGE_BYTES) -> float:
    """HBM bytes moved by the ring's merges of one query chunk: its parts
    (bf16, `part_bytes` each) are held and merged once at the end, or into
    one f32 part whenever those held pass `limit` (as _ring_forward does)."""
    held, moved = [], 0.0
    for _ in range(steps):
        held += [part_bytes] * parts_per_step
        if len(held) > 1 and sum(held) > limit:
            moved += sum(held) + 2 * part_bytes     # read them all, write one f32 part
            held = [2 * part_bytes]
    return moved + (sum(held) + part_bytes if len(held) > 1 else 0.0)


def model_case(measured, cfg, n, s, link_gbps):
    c = s // (2 * n)
    block = measured["blocks"].get(str(c), {})
    if "full" not in block or "diag" not in block:
        return None
    full, diag = block["full"], block["diag"]
    itemsize = jnp.dtype(cfg["dtype"]).itemsize
    # Merges are bandwidth-bound: the measured one (a f32 running result and
    # two parts of c rows: read 4 + 2 + 2, write 4 bytes per element) gives
    # the rate, and the ring's merges move merge_bytes(...).
    elements = c * cfg["heads"] * cfg["head_dim"]
    merge_rate = 12 * elements / block["merge_s"] if block.get("merge_s") else float("inf")
    part = elements * itemsize
    zigzag_merges = (merge_bytes(1, n, part) + merge_bytes(2, n, part)) / merge_rate   # query chunk r, 2N-1-r
    naive_merges = merge_bytes(1, n, 2 * part) / merge_rate
    kv_bytes = 2 * (2 * c) * cfg["kv_heads"] * cfg["head_dim"] * itemsize     # K and V of 2c tokens
    link = link_gbps * 1e9
    send = kv_bytes / link
    send_bwd = send * (1 + 2 * 4 / itemsize)   # backward: K, V and their f32 dK, dV accumulators

    def ring(step0, step, transfer, final_transfer=0.0):
        # Step t's compute hides the transfer step t+1 needs; the last step has none.
        return max(step0, transfer) + (n - 2) * max(step, transfer) + step + final_transfer

    def zigzag(key):
        return ring(2 * diag[key] + full[key], 2 * full[key],
                    send if key == "fwd_s" else send_bwd, 0.0 if key == "fwd_s" else send_bwd)

    zigzag_fwd = zigzag("fwd_s") + zigzag_merges
    # The ring backward calls the kernel backward with the merged out and lse
    # (flash_attention_backward): a block costs fwd_bwd - fwd. For comparison,
    # a backward that re-ran each block's forward (its vjp) costs fwd_bwd.
    rerun_bwd = zigzag("fwd_bwd_s")
    zigzag_bwd = ring(2 * (diag["fwd_bwd_s"] - diag["fwd_s"]) + (full["fwd_bwd_s"] - full["fwd_s"]),
                     2 * (full["fwd_bwd_s"] - full["fwd_s"]), send_bwd, send_bwd)
    # Naive ring, contiguous chunks of L = 2c: blocks composed of c-blocks; from
    # step 1 on the last device always has a full L x L block (4 full c-blocks).
    naive_fwd = ring(2 * diag["fwd_s"] + full["fwd_s"], 4 * full["fwd_s"], send) + naive_merges
    blocks_fwd = 2 * n * diag["fwd_s"] + n * (2 * n - 1) * full["fwd_s"]
    blocks_fwd_bwd = 2 * n * diag["fwd_bwd_s"] + n * (2 * n - 1) * full["fwd_bwd_s"]
    all_gather_fwd = (n - 1) * send + blocks_fwd / n
    t1_fwd, t1_fwd_source = _single_device(measured, s, "fwd_s", blocks_fwd)
    t1_fwd_bwd, _ = _single_device(measured, s, "fwd_bwd_s", blocks_fwd_bwd)
    efficiency = lambda t1, tn: t1 / (n * tn)  # noqa: E731
    return {
        "devices": n, "seq_len": s, "tokens_per_device": s // n, "chunk": c,
        "t1_fwd_s": t1_fwd, "t1_fwd_bwd_s": t1_fwd_bwd, "t1_source": t1_fwd_source,
        "kv_send_s": send, "step_compute_fwd_s": 2 * full["fwd_s"], "merges_fwd_s": zigzag_merges,
        "zigzag_fwd_s": zigzag_fwd, "zigzag_fwd_bwd_s": zigzag_fwd + zigzag_bwd,
        "eff_zigzag_fwd": efficiency(t1_fwd, zigzag_fwd),
        "eff_zigzag_fwd_bwd": efficiency(t1_fwd_bwd, zigzag_fwd + zigzag_bwd),
        "eff_zigzag_fwd_bwd_rerun": efficiency(t1_fwd_bwd, zigzag_fwd + rerun_bwd),
        "eff_naive_fwd": efficiency(t1_fwd, naive_fwd),
        "eff_all_gather_fwd": efficiency(t1_fwd, all_gather_fwd),
    }


def run_model(measured, cfg, cases, link_gbps):
    rows = [model_case(measured, cfg, n, s, link_gbps) for n, s in cases]
    return [r for r in rows if r is not None]


def print_table(rows, link_gbps):
    print(f"\nMODEL (link {link_gbps:g} GB/s): parallel efficiency T1 / (N * T_N)")
    header = (f"{'N':>2} {'S':>8} {'tok/dev':>8} {'T1 src':>22} {'zz fwd':>7} {'zz f+b':>7} {'rerun':>8} "
              f"{'naive':>6} {'allgath':>7} {'send/step':>9}")
    print(header)
    for r in rows:
        print(f"{r['devices']:>2} {r['seq_len']:>8} {r['tokens_per_device']:>8} {r['t1_source']:>22} "
              f"{r['eff_zigzag_fwd']:>7.1%} {r['eff_zigzag_fwd_bwd']:>7.1%} {r['eff_zigzag_fwd_bwd_rerun']:>8.1%} "
              f"{r['eff_naive_fwd']:>6.1%} {r['eff_all_gather_fwd']:>7.1%} "
              f"{r['kv_send_s'] / r['step_compute_fwd_s']:>9.2f}")
    print("rerun: fwd+bwd if the ring backward re-ran each block's forward (it does not). "
          "send/step: K/V transfer time over a ring step's forward compute.")
    print(f"Published (8xH800, 8K tokens/GPU): zig-zag {PUBLISHED['zigzag_ring_fwd']:.0%} fwd / "
          f"{PUBLISHED['zigzag_ring_fwd_bwd']:.0%} fwd+bwd, naive ring 52-54 %.")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--out", required=True, help="JSON path for measurements and model")
    parser.add_argument("--nvlink-gbps", type=float, default=900.0, help="link bandwidth per GPU, GB/s")
    parser.add_argument("--budget-s", type=float, default=None, help="wall budget of the measurements")
    parser.add_argument("--from-json", default=None, help="recompute the model from an earlier run's JSON")
    args = parser.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            previous = json.load(f)
        cfg, measured = previous["config"], previous["measured"]
        cases = [tuple(x) for x in previous["cases"]]
    else:
        cfg = dict(PRESETS[args.preset], preset=args.preset)
        if args.budget_s is not None:
            cfg["budget_s"] = args.budget_s
        print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}",
              flush=True)
        try:
            measured, cases = run_measurements(cfg)
        except Exception:  # noqa: BLE001  (write what we have)
            measured, cases = {"blocks": {}, "single_device": {}, "failures": [traceback.format_exc()[-2000:]],
                               "skipped": []}, []
    rows = run_model(measured, cfg, cases, args.nvlink_gbps)
    print_table(rows, args.nvlink_gbps)
    for line in measured.get("failures", []) + measured.get("skipped", []):
        print("  !", line)
    here = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(), "jax": jax.__version__,
            "python": platform.python_version(), "argv": sys.argv}
    if args.from_json:   # the measurements' machine, and this recomputation's command
        here = {**{k: previous[k] for k in ("device", "backend", "jax", "python", "argv")},
                "model_recomputed_with": sys.argv}
    result = {
        "what": "ring attention per-step kernel times (measured) and speedup model (a model, not a measurement)",
        **here,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
        "cases": [list(c) for c in cases], "nvlink_gbps": args.nvlink_gbps,
        "measured": measured, "model": rows, "published": PUBLISHED,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=float)
    print(f"wrote {args.out}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
