"""Tables and plots of bench results, and the cross-check of every
implementation's output against one baseline of the same case."""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

from jax_fastattn.bench.cases import Case

# The output every other one is diffed against, first present wins: cuDNN
# is the most widely used fused kernel; the reference where there is no GPU.
BASELINES = ("jax.nn-cudnn", "torch-cudnn", "reference", "jax.nn-xla", "fastattn-xla")
OURS = ("fastattn-cuda", "fastattn-cpu")


def _label(result: dict) -> str:
    return Case(**result["case"]).label()


def add_diffs(results: List[dict]) -> None:
    """Sets result["max_abs_diff"] (max |probe - baseline probe|) and
    result["diff_baseline"] in place, and drops the probes (the JSON keeps
    only the figure)."""
    by_case: Dict[str, Dict[str, dict]] = {}
    for r in results:
        if "probe" in r:
            by_case.setdefault(_label(r), {})[r["impl"]] = r
    for impls in by_case.values():
        base = next((b for b in BASELINES if b in impls), None) or next(iter(impls))
        ref = np.asarray(impls[base]["probe"], np.float32)
        for r in impls.values():
            values = np.asarray(r["probe"], np.float32)
            r["max_abs_diff"] = float(np.max(np.abs(values - ref))) if values.shape == ref.shape else float("nan")
            r["diff_baseline"] = base
    for r in results:
        r.pop("probe", None)


def _ours_median(results: List[dict]) -> Dict[str, float]:
    return {_label(r): r["median_s"] for r in results if r["impl"] in OURS and "median_s" in r}


def table(results: List[dict], gpu: bool) -> str:
    if results and results[0]["case"]["mode"] == "decode":
        return decode_table(results)
    unit, scale = ("TFLOP/s", 1.0) if gpu else ("GFLOP/s", 1e3)
    # The error against a float64 evaluation of the probed rows, where the
    # run has one (interleaved CPU runs, forward cases).
    exact = any("max_abs_err_f64" in r for r in results)
    header = (f"{'case':<44} {'implementation':<18} {'median ms':>10} {unit:>9} {'peak MB':>8} "
              f"{'ours/this':>9} {'max|diff|':>9}" + (f" {'err f64':>9}" if exact else ""))
    lines = [header, "-" * len(header)]
    ours = _ours_median(results)
    for r in results:
        label = _label(r)
        if "error" in r:
            lines.append(f"{label:<44} {r['impl']:<18} {'-':>10} {'-':>9} {'-':>8} {r['error']}")
            continue
        base = ours.get(label)
        # Speed of ours relative to this one: > 1 means ours is faster.
        ratio = f"{r['median_s'] / base:8.2f}x" if base else "-"
        diff = f"{r['max_abs_diff']:9.4f}" if "max_abs_diff" in r else "-"
        # In one process the peak RSS of one implementation is not its own.
        peak = f"{r['peak_mb']:8.0f}" if r.get("peak_mb") is not None else "-"
        error = f" {r['max_abs_err_f64']:9.1e}" if "max_abs_err_f64" in r else (f" {'-':>9}" if exact else "")
        lines.append(f"{label:<44} {r['impl']:<18} {r['median_s'] * 1e3:10.3f} {r['tflops'] * scale:9.1f} "
                     f"{peak:>8} {ratio:>9} {diff:>9}{error}")
    return "\n".join(lines)


def decode_table(results: List[dict]) -> str:
    header = f"{'case':<44} {'implementation':<18} {'median ms':>10} {'K/V GB/s':>9} {'of copy':>8} {'max|diff|':>9}"
    lines = [header, "-" * len(header)]
    copy = {_label(r): r["gbps"] for r in results if r["impl"].startswith("memcpy") and "gbps" in r}
    for r in results:
        label = _label(r)
        if "error" in r:
            lines.append(f"{label:<44} {r['impl']:<18} {'-':>10} {'-':>9} {r['error']}")
            continue
        share = f"{100 * r['gbps'] / copy[label]:7.0f}%" if label in copy and not r["impl"].startswith("memcpy") \
            else "-"
        diff = f"{r['max_abs_diff']:9.4f}" if "max_abs_diff" in r else "-"
        lines.append(f"{label:<44} {r['impl']:<18} {r['median_s'] * 1e3:10.3f} {r['gbps']:9.1f} {share:>8} {diff:>9}")
    return "\n".join(lines)


def plot(results: List[dict], path: str, gpu: bool, title: Optional[str] = None) -> None:
    """Grouped bars per case: TFLOP/s on a GPU, GFLOP/s on the CPU, K/V GB/s
    for decode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(_label(r) for r in results))
    impls = list(dict.fromkeys(r["impl"] for r in results))
    many = len(labels) > 8  # a grid (a preset): capped width, labels steeper
    fig, ax = plt.subplots(figsize=(min(22, max(6, 2.2 * len(labels))), 6 if many else 4.5))
    width = 0.8 / max(1, len(impls))
    decode = results[0]["case"]["mode"] == "decode"
    for i, impl in enumerate(impls):
        values = []
        for label in labels:
            match = [r for r in results if r["impl"] == impl and _label(r) == label]
            if not match or "error" in match[0]:
                values.append(0.0)
                continue
            values.append(match[0]["gbps"] if decode else match[0]["tflops"] * (1.0 if gpu else 1e3))
        ax.bar([x + i * width for x in range(len(labels))], values, width, label=impl)
    ax.set_xticks([x + width * (len(impls) - 1) / 2 for x in range(len(labels))])
    ax.set_xticklabels(labels, rotation=50 if many else 15, ha="right", fontsize=7)
    flops_unit = "TFLOP/s" if gpu else "GFLOP/s"
    ax.set_ylabel("K/V GB/s read" if decode else f"{flops_unit} (causal counts half, fwd+bwd 3.5x fwd)")
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
