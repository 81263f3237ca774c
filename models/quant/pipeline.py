"""The steps of a CSMPQ experiment, as plain functions: build and pre-train
a model, score it, allocate bits (CSMPQ, uniform, random), then quantize it
by QAT or PTQ and measure accuracy. csmpq.py strings them together."""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Dict, Optional, Sequence

import jax
import numpy as np
from flax import nnx

from .. import train as training
from ..data import Split
from ..mobilenet_v2 import MobileNetV2
from ..resnet import ResNet18
from .adaround import adaround, round_to_nearest
from .allocation import model_size_mb
from .fake_quant import fake_quantized, freeze_activation_ranges

# Experiment widths: small enough to train on a 2-core CPU in minutes.
MODELS: Dict[str, Callable[..., nnx.Module]] = {
    "resnet18": lambda width, rngs: ResNet18(10, 1, width=width, rngs=rngs),
    "mobilenet_v2": lambda width, rngs: MobileNetV2(10, 1, width=width, stage2_stride=2, rngs=rngs),
}
ACTIVATION_BITS = 8


@dataclasses.dataclass(frozen=True)
class ModeSpec:
    bit_choices: tuple
    fixed_bits: dict        # layer index -> bits
    theta: np.ndarray       # LP objective weights


def mode_spec(mode: str, scores: np.ndarray, beta: float = 1.0) -> ModeSpec:
    """QAT: 4-8 bits, first and last layer at 8, theta = scores.
    PTQ: 2-4 bits, theta = exp(-beta * scores)."""
    scores = np.asarray(scores, np.float64)
    if mode == "qat":
        return ModeSpec((4, 5, 6, 7, 8), {0: 8, len(scores) - 1: 8}, scores)
    if mode == "ptq":
        return ModeSpec((2, 3, 4), {}, np.exp(-beta * scores))
    raise ValueError(f"mode must be 'qat' or 'ptq', got {mode!r}")


def build(name: str, width: float, seed: int = 0) -> nnx.Module:
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name](width, nnx.Rngs(seed))


def _save(model: nnx.Module, path: str) -> None:
    leaves = jax.tree.leaves(nnx.state(model))
    np.savez(path, *[np.asarray(leaf) for leaf in leaves])


def _load(model: nnx.Module, path: str) -> None:
    state = nnx.state(model)
    leaves, treedef = jax.tree.flatten(state)
    with np.load(path) as stored:
        loaded = [stored[f"arr_{i}"] for i in range(len(stored.files))]
    if len(loaded) != len(leaves) or any(a.shape != b.shape for a, b in zip(loaded, leaves)):
        raise ValueError(f"{path} does not hold this model's weights; delete it to retrain")
    nnx.update(model, jax.tree.unflatten(treedef, loaded))


def pretrained(name: str, width: float, data: Split, *, epochs: int, learning_rate: float = 0.05,
               cache_dir: Optional[str] = None, data_seed: int = 0, seed: int = 0, progress=None) -> nnx.Module:
    """The full-precision model, initialised and shuffled with `seed` and
    trained on data (or loaded from cache_dir if an earlier run with the same
    settings, data split `data_seed` and `seed` included, saved it there)."""
    model = build(name, width, seed)
    path = None
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
        tag = f"split{data_seed}" + (f"_seed{seed}" if seed else "")
        path = os.path.join(cache_dir, f"fp_{name}_w{width}_e{epochs}_lr{learning_rate}_{tag}.npz")
        if os.path.exists(path):
            _load(model, path)
            model.eval()
            return model
    training.train(model, data.x_train, data.y_train, epochs=epochs, learning_rate=learning_rate, seed=seed,
                   progress=progress)
    if path:
        _save(model, path)
    return model


def uniform_bits(num_layers: int, params: Sequence[int], budget_mb: float, spec: ModeSpec) -> tuple:
    """The widest single bit-width for the free layers that meets the budget."""
    for bits in sorted(spec.bit_choices, reverse=True):
        allocation = [spec.fixed_bits.get(l, bits) for l in range(num_layers)]
        if model_size_mb(params, allocation) <= budget_mb + 1e-12:
            return tuple(allocation)
    raise ValueError(f"size budget {budget_mb:.4f} MB is below every uniform allocation")


def random_bits(params: Sequence[int], budget_mb: float, spec: ModeSpec, rng: np.random.Generator) -> tuple:
    """A random allocation within the budget: free layers in random order each
    take a random width among those that still leave room for the rest at
    the smallest width."""
    lowest = min(spec.bit_choices)
    bits = [spec.fixed_bits.get(l, lowest) for l in range(len(params))]
    free = [l for l in range(len(params)) if l not in spec.fixed_bits]
    for l in rng.permutation(free):
        room = budget_mb - model_size_mb(params, bits)
        fitting = [b for b in spec.bit_choices if params[l] * (b - lowest) / 8 / 2**20 <= room + 1e-12]
        bits[l] = int(rng.choice(fitting))
    return tuple(bits)


def fill_budget(bits: Sequence[int], params: Sequence[int], budget_mb: float, spec: ModeSpec,
                rng: np.random.Generator) -> tuple:
    """Repair an allocation that leaves budget unspent: raise a randomly
    chosen free layer by one allowed width while any such step still fits,
    until none does (the result is maximal: no single step fits)."""
    choices = sorted(spec.bit_choices)
    bits = list(bits)
    free = [l for l in range(len(params)) if l not in spec.fixed_bits]
    while True:
        room = budget_mb - model_size_mb(params, bits)
        steps = []
        for l in free:
            higher = [b for b in choices if b > bits[l]]
            if higher and params[l] * (higher[0] - bits[l]) / 8 / 2**20 <= room + 1e-12:
                steps.append((l, higher[0]))
        if not steps:
            return tuple(bits)
        l, b = steps[rng.integers(len(steps))]
        bits[l] = b


def random_bits_full_budget(params: Sequence[int], budget_mb: float, spec: ModeSpec, rng: np.random.Generator,
                            min_fill: float = 0.98, max_draws: int = 200) -> tuple:
    """A random allocation that spends the budget as fully as the integer
    program does: a `random_bits` draw, repaired by `fill_budget`, kept if it
    uses at least `min_fill` of the budget (else drawn again)."""
    if not 0 < min_fill <= 1:
        raise ValueError(f"min_fill must be in (0, 1], got {min_fill}")
    for _ in range(max_draws):
        bits = fill_budget(random_bits(params, budget_mb, spec, rng), params, budget_mb, spec, rng)
        if model_size_mb(params, bits) >= min_fill * budget_mb - 1e-12:
            return bits
    raise ValueError(f"no random allocation in {max_draws} draws used min_fill={min_fill} of the "
                     f"{budget_mb:.4f} MB budget; lower min_fill")


def qat_accuracy(model: nnx.Module, bits: Sequence[int], data: Split, *, epochs: int, learning_rate: float,
                 seed: int = 0, progress=None) -> float:
    """Fine-tune a fake-quantized copy (straight-through gradients, batches
    shuffled with `seed`) and test it."""
    quantized = fake_quantized(model, bits, ACTIVATION_BITS, data.x_train[:64])
    training.train(quantized, data.x_train, data.y_train, epochs=epochs, learning_rate=learning_rate, seed=seed,
                   progress=progress)
    freeze_activation_ranges(quantized)
    return training.accuracy(quantized, data.x_test, data.y_test)


def ptq_accuracy(model: nnx.Module, bits: Sequence[int], data: Split, *, calibration_size: int = 256,
                 rounding: str = "adaround", steps: int = 200, seed: int = 0, progress=None) -> float:
    """Round weights (AdaRound, or to nearest), calibrate activation ranges on
    the calibration images, and test. Calibration images are training images."""
    calibration = data.x_train[:calibration_size]
    if rounding == "adaround":
        rounded = adaround(model, bits, calibration, steps=steps, seed=seed, progress=progress)
    elif rounding == "nearest":
        rounded = nnx.clone(model)
        for layer, b in zip(rounded.quantizable_layers(), bits):
            kernel = layer.conv.kernel if hasattr(layer, "conv") else layer.kernel
            kernel.value = round_to_nearest(kernel.value, int(b))
    else:
        raise ValueError(f"rounding must be 'adaround' or 'nearest', got {rounding!r}")
    quantized = fake_quantized(rounded, None, ACTIVATION_BITS, calibration[:64])
    quantized.eval()
    for start in range(0, calibration_size, 64):
        quantized(calibration[start:start + 64])
    freeze_activation_ranges(quantized)
    return training.accuracy(quantized, data.x_test, data.y_test)
