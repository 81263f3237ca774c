"""Supervised training and evaluation of the CNNs in models/ (Flax NNX +
optax), used to get full-precision weights and to fine-tune quantized ones."""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from .data import batches


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@nnx.jit
def train_step(model, optimizer, x, y):
    """One optimizer step on the cross-entropy of (x, y); returns the loss."""
    def loss_fn(model):
        return cross_entropy(model(x), y)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def train(model: nnx.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, learning_rate: float,
          batch_size: int = 64, seed: int = 0, progress: Optional[Callable] = None) -> list:
    """SGD with momentum and a cosine schedule; batch norm in training mode.
    Returns the mean loss of each epoch. `progress(iterable, total)` wraps the
    step loop (a tqdm bar in the CLI)."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    steps_per_epoch = len(x) // batch_size
    schedule = optax.cosine_decay_schedule(learning_rate, epochs * steps_per_epoch)
    optimizer = nnx.Optimizer(model, optax.chain(optax.add_decayed_weights(5e-4),
                                                 optax.sgd(schedule, momentum=0.9)), wrt=nnx.Param)
    rng = np.random.default_rng(seed)
    model.train()
    losses = []
    for _ in range(epochs):
        steps = batches(x, y, batch_size, rng)
        if progress is not None:
            steps = progress(steps, steps_per_epoch)
        epoch = [train_step(model, optimizer, jnp.asarray(bx), jnp.asarray(by)) for bx, by in steps]
        losses.append(float(jnp.mean(jnp.stack(epoch))))
    model.eval()
    return losses


@nnx.jit
def _correct(model, x, y):
    return jnp.sum(jnp.argmax(model(x), axis=-1) == y)


def accuracy(model: nnx.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 250) -> float:
    """Top-1 accuracy with batch norm in inference mode."""
    model.eval()
    correct = 0
    for start in range(0, len(x), batch_size):
        correct += int(_correct(model, jnp.asarray(x[start:start + batch_size]),
                                jnp.asarray(y[start:start + batch_size])))
    return correct / len(x)
