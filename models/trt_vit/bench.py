"""Latency harness: `python -m models.trt_vit.bench --out results.json`.

Every TRT-ViT variant and baseline (ResNet-50/101/152, ViT-S/16, the
PVT-style pyramid), or with `--experiments guidelines` the four guideline
comparisons, in one run: batch 8, 224x224, bf16 and fp16, XLA-compiled,
warm-up then the median of >= 100 timed calls; parameters, FLOPs (XLA cost
analysis), latency, images/s; a table on stdout, JSON at --out, a PNG plot
beside it. A failing case (OOM, unsupported op) is recorded, not fatal.

TensorRT is not used: XLA on the GPU is the deployment-latency metric.

  --preset full   batch 8, 224x224, 10 warm-up + 100 timed calls (the GPU run)
  --preset dry    batch 1, 64x64, models narrowed to width 0.25 with head dim
                  16, 1 + 3 calls (proves the harness on a CPU)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from typing import Callable, Dict, List, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from .backbone import VARIANTS, Backbone, BackboneConfig
from .baselines import PVT_SMALL, RESNETS, ViT
from .blocks import ATTENTION_BACKENDS
from .experiments import guideline_experiments
from .measure import count_params, latency, xla_flops

DTYPES = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32}
PRESETS = {
    "full": dict(batch=8, image_size=224, width=1.0, head_dim=None, warmup=10, repeats=100),
    "dry": dict(batch=1, image_size=64, width=0.25, head_dim=16, warmup=1, repeats=3),
}


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    group: str                                # "trt_vit", "baseline" or an experiment key
    build: Callable[[str], nnx.Module]        # attention backend -> model


def _narrow(cfg: BackboneConfig, width: float, head_dim: Optional[int]) -> BackboneConfig:
    if head_dim is not None:
        cfg = cfg.replace(head_dim=head_dim)
    return cfg if width == 1.0 else cfg.scaled(width)


def _backbone_entry(cfg: BackboneConfig, group: str, width: float, head_dim: Optional[int]) -> Entry:
    cfg = _narrow(cfg, width, head_dim)
    return Entry(cfg.name, group, lambda backend: Backbone(cfg.replace(attention_backend=backend),
                                                            rngs=nnx.Rngs(0)))


def model_entries(width: float, head_dim: Optional[int], image_size: int) -> List[Entry]:
    entries = [_backbone_entry(cfg, "trt_vit", width, head_dim) for cfg in VARIANTS.values()]
    entries += [_backbone_entry(cfg, "baseline", width, head_dim) for cfg in RESNETS.values()]
    entries.append(_backbone_entry(PVT_SMALL, "baseline", width, head_dim))
    dim = max(6 * (head_dim or 64), int(round(384 * width / 6 / 8)) * 6 * 8) if width != 1.0 else 384
    entries.append(Entry("ViT-S/16", "baseline",
                         lambda backend: ViT(image_size=image_size, dim=dim, attention_backend=backend,
                                             rngs=nnx.Rngs(0))))
    return entries


def guideline_entries(width: float, head_dim: Optional[int]) -> List[Entry]:
    return [_backbone_entry(cfg, key, width, head_dim)
            for key, experiment in guideline_experiments().items() for cfg in experiment.members]


def measure_entry(entry: Entry, dtypes: List[str], batch: int, image_size: int, warmup: int,
                  repeats: int, attention_backend: str = "auto") -> List[Dict]:
    """One row per dtype; an exception becomes that row's `error`."""
    shape = (batch, image_size, image_size, 3)
    base = {"name": entry.name, "group": entry.group, "batch": batch, "image_size": image_size,
            "attention_backend": attention_backend}
    try:
        model = entry.build(attention_backend)
        params = count_params(model)
        flops = xla_flops(model, shape)
    except Exception as error:  # noqa: BLE001 - recorded per case, the run goes on
        return [dict(base, dtype=d, error=f"{type(error).__name__}: {error}"[:500]) for d in dtypes]
    rows = []
    for name in dtypes:
        row = dict(base, dtype=name, params=params, gflops=flops / 1e9)
        try:
            timing = latency(model, shape, DTYPES[name], warmup=warmup, repeats=repeats)
            row.update(timing)
            row["images_per_s"] = batch / (timing["median_ms"] / 1e3)
            row["gflops_per_ms"] = flops / 1e9 / timing["median_ms"]
        except Exception as error:  # noqa: BLE001
            row["error"] = f"{type(error).__name__}: {error}"[:500]
        rows.append(row)
    del model
    jax.clear_caches()
    return rows


def _ok(row) -> bool:
    return "error" not in row


def resnet50_check(rows: List[Dict]) -> List[Dict]:
    """Per dtype: the TRT-ViT variant with latency nearest ResNet-50's and
    its FLOPs per ms relative to ResNet-50's (the issue asks >= 1.2)."""
    checks = []
    for dtype in sorted({r["dtype"] for r in rows}):
        resnet = [r for r in rows if r["dtype"] == dtype and r["name"].startswith("ResNet-50") and _ok(r)]
        variants = [r for r in rows if r["dtype"] == dtype and r["group"] == "trt_vit" and _ok(r)]
        if not resnet or not variants:
            continue
        nearest = min(variants, key=lambda r: abs(r["median_ms"] - resnet[0]["median_ms"]))
        ratio = nearest["gflops_per_ms"] / resnet[0]["gflops_per_ms"]
        checks.append({"dtype": dtype, "variant": nearest["name"], "latency_ratio":
                       nearest["median_ms"] / resnet[0]["median_ms"], "flops_per_ms_ratio": ratio,
                       "meets_1.2x": ratio >= 1.2})
    return checks


def guideline_summary(rows: List[Dict]) -> List[Dict]:
    """Per experiment and dtype: each member's FLOPs and latency relative to
    the guideline's choice (members[0]); the guideline holds on latency when
    every other member is slower."""
    summary = []
    for key, experiment in guideline_experiments().items():
        for dtype in sorted({r["dtype"] for r in rows}):
            members = [r for r in rows if r["group"] == key and r["dtype"] == dtype]
            if not members or not all(_ok(r) for r in members):
                summary.append({"experiment": key, "guideline": experiment.guideline, "dtype": dtype,
                                "error": "a member failed or is missing"})
                continue
            favoured = members[0]
            others = [{"name": r["name"], "flops_ratio": r["gflops"] / favoured["gflops"],
                       "latency_ratio": r["median_ms"] / favoured["median_ms"]} for r in members[1:]]
            summary.append({"experiment": key, "guideline": experiment.guideline, "question": experiment.question,
                            "dtype": dtype, "favoured": favoured["name"], "favoured_ms": favoured["median_ms"],
                            "others": others, "holds": all(o["latency_ratio"] > 1.0 for o in others),
                            "min_speedup": min(o["latency_ratio"] for o in others)})
    return summary


def print_table(rows: List[Dict], out=sys.stdout) -> None:
    print(f"{'model':48s} {'dtype':5s} {'params M':>9s} {'GFLOP':>8s} {'ms':>8s} {'img/s':>9s} {'GFLOP/ms':>9s}",
          file=out)
    for r in rows:
        if _ok(r):
            print(f"{r['name']:48s} {r['dtype']:5s} {r['params'] / 1e6:9.2f} {r['gflops']:8.2f} "
                  f"{r['median_ms']:8.3f} {r['images_per_s']:9.1f} {r['gflops_per_ms']:9.2f}", file=out)
        else:
            print(f"{r['name']:48s} {r['dtype']:5s} FAILED {r['error'][:80]}", file=out)


def plot(rows: List[Dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r["dtype"] for r in rows})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(7 * len(dtypes), 5.5), squeeze=False)
    groups = sorted({r["group"] for r in rows})
    markers = dict(zip(groups, "osD^v<>ph*"))
    for ax, dtype in zip(axes[0], dtypes):
        for r in rows:
            if r["dtype"] != dtype or not _ok(r):
                continue
            ax.scatter(r["median_ms"], r["gflops"], marker=markers[r["group"]], s=40,
                       label=r["group"])
            ax.annotate(r["name"], (r["median_ms"], r["gflops"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=7)
        ax.set_xlabel("latency, median ms per batch")
        ax.set_ylabel("GFLOP per batch (XLA cost analysis)")
        ax.set_title(f"{title} — {dtype}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def environment() -> Dict:
    device = jax.devices()[0]
    return {"device": getattr(device, "device_kind", str(device)), "platform": device.platform,
            "jax": jax.__version__, "python": platform.python_version(),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON path (the PNG plot goes beside it)")
    parser.add_argument("--experiments", choices=("models", "guidelines"), default="models")
    parser.add_argument("--preset", choices=tuple(PRESETS), default="full")
    parser.add_argument("--dtypes", default="bf16,fp16", help=f"comma list of {tuple(DTYPES)}")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS,
                        help="flash_attention backend of every attention layer (plain: einsum + softmax)")
    parser.add_argument("--only", default=None, help="comma list of substrings; run matching models only")
    args = parser.parse_args(argv)
    settings = dict(PRESETS[args.preset])
    for key in ("batch", "image_size", "repeats", "warmup"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    dtypes = args.dtypes.split(",")
    for name in dtypes:
        if name not in DTYPES:
            raise ValueError(f"--dtypes entries must be in {tuple(DTYPES)}, got {name!r}")
    if settings["repeats"] < (100 if args.preset == "full" else 1):
        raise ValueError(f"--repeats must be >= 100 for the full preset, got {settings['repeats']}")
    return args, settings, dtypes


def main(argv=None) -> Dict:
    args, settings, dtypes = parse_args(argv)
    if args.experiments == "models":
        entries = model_entries(settings["width"], settings["head_dim"], settings["image_size"])
    else:
        entries = guideline_entries(settings["width"], settings["head_dim"])
    if args.only:
        wanted = args.only.split(",")
        entries = [e for e in entries if any(w in e.name for w in wanted)]
    rows, start = [], time.perf_counter()
    result = {"experiments": args.experiments, "preset": args.preset, "settings": settings,
              "attention_backend": args.attention_backend, "environment": environment(), "complete": False,
              "rows": rows}
    for entry in entries:
        case_start = time.perf_counter()
        rows += measure_entry(entry, dtypes, settings["batch"], settings["image_size"], settings["warmup"],
                              settings["repeats"], args.attention_backend)
        print(f"  {entry.name}: {time.perf_counter() - case_start:.1f} s", file=sys.stderr, flush=True)
        result["wall_s"] = time.perf_counter() - start
        with open(args.out, "w") as f:  # partial results survive a run cut short
            json.dump(result, f, indent=1)
    result["complete"] = True
    if args.experiments == "models":
        result["resnet50_check"] = resnet50_check(rows)
    else:
        result["guidelines"] = guideline_summary(rows)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print_table(rows)
    for check in result.get("resnet50_check", []):
        print(f"[{check['dtype']}] nearest ResNet-50 latency: {check['variant']} "
              f"(x{check['latency_ratio']:.2f} latency), FLOPs/ms x{check['flops_per_ms_ratio']:.2f} of ResNet-50")
    for item in result.get("guidelines", []):
        if "error" in item:
            print(f"[{item['dtype']}] guideline {item['guideline']} ({item['experiment']}): {item['error']}")
            continue
        others = ", ".join(f"{o['name']} x{o['latency_ratio']:.2f} latency at x{o['flops_ratio']:.2f} FLOPs"
                           for o in item["others"])
        print(f"[{item['dtype']}] guideline {item['guideline']} holds={item['holds']}: {item['favoured']} "
              f"{item['favoured_ms']:.3f} ms; {others}")
    png = args.out.rsplit(".", 1)[0] + ".png"
    try:
        plot(rows, png, "TRT-ViT and baselines" if args.experiments == "models" else "guideline experiments")
    except Exception as error:  # noqa: BLE001 - the JSON is the result; the plot is a view of it
        print(f"plot failed: {error}", file=sys.stderr)
    print(f"wall {result['wall_s']:.1f} s; JSON {args.out}; plot {png}")
    return result


if __name__ == "__main__":
    main()
