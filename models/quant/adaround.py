"""Post-training weight rounding by AdaRound (Nagel et al. 2020), optimised
for all layers at once against every layer's full-precision output.

Each weight w of a layer with b bits sits between two grid points of its
output channel's scale s (qwix's symmetric convention, s = absmax /
(2^(b-1) - 0.5)): s*floor(w/s) and s*(floor(w/s)+1). AdaRound learns which
one, through a soft choice h(V) = clip(1.2 sigmoid(V) - 0.1, 0, 1) that a
regulariser pushes to 0 or 1 (its exponent beta anneals 20 -> 2):

    loss = sum_l |o_l(W~) - o_l(W)|^2 / |o_l(W)|^2 + lam * sum_l mean(1 - |2h - 1|^beta)

o_l are the quantizable layers' outputs (the model's collect=True outputs)
on the calibration images, with activations in float. Reconstructing all
layer outputs together in one network pass (rather than layer by layer, as
the paper does) needs no per-layer input capture and still gives every
layer its own target. At the end h is rounded: V >= 0 rounds up.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ..layers import ConvBN

_ZETA, _GAMMA = 1.1, -0.1  # stretch of the rectified sigmoid, as in the paper


def _kernel_of(layer):
    return layer.conv.kernel if isinstance(layer, ConvBN) else layer.kernel


def channel_scale(kernel, bits: int):
    """Per-output-channel (last axis) symmetric scale, qwix's convention."""
    absmax = jnp.max(jnp.abs(kernel), axis=tuple(range(kernel.ndim - 1)), keepdims=True)
    return jnp.where(absmax > 0, absmax, 1.0) / (2.0 ** (bits - 1) - 0.5)


def round_to_nearest(kernel, bits: int):
    scale = channel_scale(kernel, bits)
    return scale * jnp.clip(jnp.round(kernel / scale), -2 ** (bits - 1), 2 ** (bits - 1) - 1)


def _soft(v):
    return jnp.clip(jax.nn.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0.0, 1.0)


def _rounded(kernel, v, bits, hard: bool):
    scale = channel_scale(kernel, bits)
    up = (v >= 0).astype(kernel.dtype) if hard else _soft(v)
    return scale * jnp.clip(jnp.floor(kernel / scale) + up, -2 ** (bits - 1), 2 ** (bits - 1) - 1)


def _initial_v(kernel, bits):
    """V with h(V) = the fractional part: starts at the float weights."""
    scale = channel_scale(kernel, bits)
    fraction = kernel / scale - jnp.floor(kernel / scale)
    p = jnp.clip((fraction - _GAMMA) / (_ZETA - _GAMMA), 1e-4, 1 - 1e-4)
    return jnp.log(p / (1 - p))


def _with_kernels(graphdef, state, kernels):
    # copy=True: fresh Variables of this trace, the caller's stay untouched.
    model = nnx.merge(graphdef, state, copy=True)
    for layer, kernel in zip(model.quantizable_layers(), kernels):
        _kernel_of(layer).value = kernel
    return model


def adaround(model: nnx.Module, weight_bits: Sequence[int], calibration: np.ndarray, *, steps: int = 200,
             batch_size: int = 32, learning_rate: float = 3e-2, regularisation: float = 3.0,
             warmup: float = 0.2, seed: int = 0, progress: Optional[Callable] = None) -> nnx.Module:
    """A copy of `model` (inference mode) whose quantizable layers' kernels
    are rounded onto their `weight_bits` grids by AdaRound."""
    layers = model.quantizable_layers()
    if len(weight_bits) != len(layers):
        raise ValueError(f"weight_bits has {len(weight_bits)} entries for {len(layers)} quantizable layers")
    model = nnx.clone(model)
    model.eval()
    graphdef, state = nnx.split(model)
    floats = [_kernel_of(layer).value for layer in model.quantizable_layers()]
    bits = [int(b) for b in weight_bits]
    vs = [_initial_v(k, b) for k, b in zip(floats, bits)]

    def loss_fn(vs, x, beta, reg):
        target = nnx.merge(graphdef, state, copy=True)(x, collect=True)[1]
        soft = [_rounded(k, v, b, hard=False) for k, v, b in zip(floats, vs, bits)]
        outputs = _with_kernels(graphdef, state, soft)(x, collect=True)[1]
        recon = sum(jnp.sum((o - t) ** 2) / jnp.maximum(jnp.sum(t ** 2), 1e-12) for o, t in zip(outputs, target))
        binarise = sum(jnp.mean(1 - jnp.abs(2 * _soft(v) - 1) ** beta) for v in vs)
        return recon + reg * binarise

    optimizer = optax.adam(learning_rate)

    @jax.jit
    def step(vs, opt_state, x, beta, reg):
        loss, grads = jax.value_and_grad(loss_fn)(vs, x, beta, reg)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(vs, updates), opt_state, loss

    opt_state = optimizer.init(vs)
    rng = np.random.default_rng(seed)
    iterations = range(steps) if progress is None else progress(range(steps), steps)
    for i in iterations:
        x = jnp.asarray(calibration[rng.choice(len(calibration), batch_size, replace=False)])
        # Reconstruction only during warm-up, then the annealed regulariser.
        annealed = max(0.0, (i - warmup * steps) / max(1.0, (1 - warmup) * steps))
        beta = 20.0 - 18.0 * annealed
        reg = 0.0 if i < warmup * steps else regularisation
        vs, opt_state, _ = step(vs, opt_state, x, beta, reg)
    hard = [_rounded(k, v, b, hard=True) for k, v, b in zip(floats, vs, bits)]
    return _with_kernels(graphdef, state, hard)
