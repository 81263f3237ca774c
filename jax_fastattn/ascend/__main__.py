"""`python -m jax_fastattn.ascend`: print a tiling plan and its modelled time.

    python -m jax_fastattn.ascend --seq 8192 --heads 32 --head-dim 128 --causal
    python -m jax_fastattn.ascend --table llama7b      # the tables of docs/ASCEND.md
    python -m jax_fastattn.ascend --seq 300 --heads 2 --head-dim 64 --causal --simulate

All times are a roofline-style model (cost.py), not measurements.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from .. import masks
from . import cost, tiling_mask
from .hardware import HARDWARE
from .tiling import plan

LLAMA7B_SEQS = (1024, 2048, 4096, 8192, 16384, 32768)
PAPER_SPEEDUP = 10.7   # FastAttention on Ascend vs standard attention (arXiv 2410.16663, abstract)


def _mask(args):
    if args.window is not None:
        return masks.SlidingWindow(args.window, 0)
    return None


def _plans(args, seq, kv_seq, heads, kv_heads):
    shape = (args.batch, seq, kv_seq, heads, kv_heads, args.head_dim)
    kwargs = dict(causal=args.causal, mask=_mask(args))
    single = plan(shape, args.dtype, HARDWARE[args.hw], two_level=False, **kwargs)
    level1 = (args.block_q, args.block_kv) if args.block_q or args.block_kv else None
    if level1 is not None:
        level1 = (args.block_q or 128, args.block_kv or 1024)
    two = plan(shape, args.dtype, HARDWARE[args.hw], two_level=True, level1=level1, **kwargs)
    return single, two


def _row(seq, single, two, args):
    t1, t2 = cost.fused_time(single, args.sync_us), cost.fused_time(two, args.sync_us)
    std = cost.standard_time(two.shape, args.dtype, two.hw, causal=args.causal or args.window is not None)
    moved = lambda p: sum(p.counters.bytes[k] for k in ("gm_to_l1", "l0c_out", "gm_to_ub", "ub_to_gm"))
    return {
        "seq": seq, "syncs_single": single.counters.syncs, "syncs_two": two.counters.syncs,
        "l2_bytes_single": t1.l2_bytes, "l2_bytes_two": t2.l2_bytes,
        "moved_bytes_single": moved(single), "moved_bytes_two": moved(two),
        "l1_to_l0_single": single.counters.bytes["l1_to_l0"], "l1_to_l0_two": two.counters.bytes["l1_to_l0"],
        "hbm_bytes_two": t2.hbm_bytes,
        "time_single_ms": t1.seconds * 1e3, "bound_single": t1.bound,
        "time_two_ms": t2.seconds * 1e3, "bound_two": t2.bound,
        "time_standard_ms": std.seconds * 1e3, "standard_fits_hbm": std.fits,
        "standard_peak_gib": std.peak_bytes / 2**30,
        "speedup_two_vs_single": t1.seconds / t2.seconds,
        "speedup_vs_standard": std.seconds / t2.seconds,
    }


def _print_table(rows, args):
    print(f"Llama-7B attention (B={args.batch}, H=32, D=128, {args.dtype}, "
          f"{'causal' if args.causal else 'full'}), {HARDWARE[args.hw].name}: "
          f"MODEL (roofline-style, not measured); handoff latency {args.sync_us or HARDWARE[args.hw].sync_us} us")
    print()
    print("| S | syncs 1-level | syncs 2-level | L2 traffic 1-level (GiB) | L2 traffic 2-level (GiB) "
          "| time 1-level (ms) | time 2-level (ms) | 2-level / 1-level | standard (ms) | fused vs standard (model) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        std = f"{r['time_standard_ms']:.2f}" + ("" if r["standard_fits_hbm"] else
                                                 f" (OOM: {r['standard_peak_gib']:.0f} GiB)")
        print(f"| {r['seq']} | {r['syncs_single']:,} | {r['syncs_two']:,} | {r['l2_bytes_single'] / 2**30:.2f} "
              f"| {r['l2_bytes_two'] / 2**30:.2f} | {r['time_single_ms']:.3f} ({r['bound_single']}) "
              f"| {r['time_two_ms']:.3f} ({r['bound_two']}) | {r['speedup_two_vs_single']:.2f}x | {std} "
              f"| {r['speedup_vs_standard']:.1f}x |")
    print(f"\nPaper (measured on Ascend 910B): {PAPER_SPEEDUP}x over standard attention.")
    print()
    print("| S | dense bool mask [S, S] | compressed 2048x2048 | band (2 ints) | dense / compressed |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        m = tiling_mask.mask_memory(r["seq"], r["seq"])
        print(f"| {r['seq']} | {m['dense_bytes'] / 2**20:,.0f} MiB | {m['compressed_bytes'] / 2**20:.0f} MiB "
              f"| {m['band_bytes']} B | {m['dense_over_compressed']:.2f}x |")


SIMULATE_MAX_SCORES = 1 << 24  # the simulator is a Python loop: ~seconds per million scores


def _simulate(args):
    from .simulator import simulate
    scores = args.batch * args.heads * args.seq * (args.kv_seq or args.seq)
    if scores > SIMULATE_MAX_SCORES:
        raise ValueError(f"--simulate runs the tile simulator in Python: B*H*Sq*Skv must be at most "
                         f"{SIMULATE_MAX_SCORES:,}, got {scores:,} (the plan and the model above cover any size)")
    import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16")
    rng = np.random.default_rng(0)
    kv_seq = args.kv_seq or args.seq
    kv_heads = args.kv_heads or args.heads
    q = rng.standard_normal((args.batch, args.seq, args.heads, args.head_dim)).astype(args.dtype)
    k = rng.standard_normal((args.batch, kv_seq, kv_heads, args.head_dim)).astype(args.dtype)
    v = rng.standard_normal((args.batch, kv_seq, kv_heads, args.head_dim)).astype(args.dtype)
    result = simulate(q, k, v, causal=args.causal, mask=_mask(args), hw=HARDWARE[args.hw],
                      two_level=not args.single_level)
    from ..reference import attention_reference
    import jax.numpy as jnp
    mplan = result.plan.mask_plan
    out, lse = attention_reference(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), mplan,
                                   softmax_scale=1.0 / np.sqrt(args.head_dim))
    err = float(np.max(np.abs(result.out.astype(np.float32) - np.asarray(out))))
    finite = np.isfinite(np.asarray(lse))
    lse_err = float(np.max(np.abs(result.lse[finite] - np.asarray(lse)[finite]), initial=0.0))
    print(f"simulated: max |out - reference| {err:.2e}, max |lse - reference| {lse_err:.2e}; "
          f"counters equal the plan's: {result.counters == result.plan.counters}")
    return {"max_abs_err_out": err, "max_abs_err_lse": lse_err}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jax_fastattn.ascend", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=8192, help="query length Sq")
    parser.add_argument("--kv-seq", type=int, default=None, help="key length Skv (default Sq)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=None, help="kv heads (GQA; default --heads)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--window", type=int, default=None, help="sliding window: keys up to WINDOW back")
    parser.add_argument("--hw", choices=sorted(HARDWARE), default="910B")
    parser.add_argument("--block-q", type=int, default=None, help="level-1 block rows (default 128)")
    parser.add_argument("--block-kv", type=int, default=None, help="level-1 block keys (default 1024)")
    parser.add_argument("--single-level", action="store_true", help="describe the single-level plan")
    parser.add_argument("--sync-us", type=float, default=None, help="Cube<->Vector handoff latency (model)")
    parser.add_argument("--table", choices=("llama7b",), default=None,
                        help="print the Llama-7B single- vs two-level table (S = 1K..32K, causal)")
    parser.add_argument("--simulate", action="store_true",
                        help="also run the tile simulator on random inputs and compare with the reference")
    parser.add_argument("--json", default=None, help="write the results as JSON to this path")
    args = parser.parse_args(argv)
    try:
        if args.table == "llama7b":
            args.causal = True
            rows = [_row(s, *_plans(args, s, s, 32, 32), args) for s in LLAMA7B_SEQS]
            _print_table(rows, args)
            result = {"table": "llama7b", "rows": rows}
        else:
            kv_seq = args.kv_seq or args.seq
            single, two = _plans(args, args.seq, kv_seq, args.heads, args.kv_heads or args.heads)
            print((single if args.single_level else two).describe())
            row = _row(args.seq, single, two, args)
            print(f"MODEL (roofline-style, not measured): single-level {row['time_single_ms']:.3f} ms "
                  f"({row['bound_single']}-bound), two-level {row['time_two_ms']:.3f} ms ({row['bound_two']}-bound), "
                  f"standard unfused {row['time_standard_ms']:.3f} ms"
                  + ("" if row["standard_fits_hbm"] else " (does not fit HBM)")
                  + f"; two-level vs standard {row['speedup_vs_standard']:.1f}x")
            result = {"row": row}
            if args.simulate:
                result["simulation"] = _simulate(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
