"""A Hessian-trace sensitivity baseline for mixed-precision allocation
(HAWQ-v2, Dong et al. 2020, arXiv 1911.03852; its integer-program form is
HAWQ-v3, Yao et al. 2021, arXiv 2011.10680).

For layer l with n_l weights W_l, HAWQ-v2 measures sensitivity by the
average Hessian trace of the loss with respect to W_l and weighs it by the
quantization perturbation at b bits:

    Omega_l(b) = Tr(H_l) / n_l * |Q_b(W_l) - W_l|^2

Tr(H_l) is estimated by Hutchinson's method, E[v^T H_ll v] = Tr(H_ll) for a
Rademacher vector v over layer l's kernel, one Hessian-vector product per
layer and probe. (A single probe over all kernels at once would also be
unbiased, but its cross-layer terms v_l^T H_lk v_k swamp the trace of small
layers such as the stem.) The allocation then
minimises sum_l Omega_l(b_l) under the same size budget and the same exact
integer program as CSMPQ (`allocation.allocate_bits_table`). Unlike CSMPQ's
score it needs labels and second-order autodiff.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from .adaround import round_to_nearest
from ..layers import ConvBN


def _kernel_of(layer):
    return layer.conv.kernel if isinstance(layer, ConvBN) else layer.kernel


def kernels(model: nnx.Module) -> list:
    """The weight kernel of every quantizable layer, in order."""
    return [_kernel_of(layer).value for layer in model.quantizable_layers()]


def loss_of_kernels(model: nnx.Module):
    """f(kernels, x, y): mean cross-entropy of `model` (inference mode) with
    its quantizable layers' kernels replaced by `kernels`."""
    model = nnx.clone(model)
    model.eval()
    graphdef, state = nnx.split(model)

    def loss(kernel_list, x, y):
        replaced = nnx.merge(graphdef, state, copy=True)
        for layer, kernel in zip(replaced.quantizable_layers(), kernel_list):
            _kernel_of(layer).value = kernel
        return optax.softmax_cross_entropy_with_integer_labels(replaced(x), y).mean()

    return loss


def hutchinson_traces(model: nnx.Module, x: np.ndarray, y: np.ndarray, *, samples: int = 32,
                      seed: int = 0, layers: Optional[Sequence[int]] = None) -> np.ndarray:
    """Tr(H_l) of the loss on (x, y) for every quantizable layer's kernel
    (or those indexed by `layers`, in that order): the mean of v^T H_ll v
    over `samples` Rademacher probes per layer."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    loss = loss_of_kernels(model)
    weights = kernels(model)
    x, y = jnp.asarray(x), jnp.asarray(y)
    gradient = jax.grad(loss)

    # Weights and data are arguments, not closed-over constants: XLA would
    # otherwise constant-fold the convolutions over them while compiling.
    @jax.jit
    def probe(weights, x, y, key, layer_mask):
        # layer_mask: one-hot over layers, so one compiled function serves all.
        keys = jax.random.split(key, len(weights))
        vs = [m * jax.random.rademacher(k, w.shape, w.dtype) for m, k, w in zip(layer_mask, keys, weights)]
        _, hv = jax.jvp(lambda ws: gradient(ws, x, y), (weights,), (vs,))
        return sum(jnp.sum(v * h) for v, h in zip(vs, hv))

    keys = jax.random.split(jax.random.PRNGKey(seed), samples)
    eye = jnp.eye(len(weights), dtype=weights[0].dtype)
    layers = range(len(weights)) if layers is None else layers
    for l in layers:
        if not 0 <= l < len(weights):
            raise ValueError(f"layers names layer {l}, but the model has {len(weights)} quantizable layers")
    return np.array([np.mean([float(probe(weights, x, y, k, eye[l])) for k in keys]) for l in layers])


def perturbations(model: nnx.Module, bit_choices: Sequence[int]) -> np.ndarray:
    """[layers, choices]: |Q_b(W_l) - W_l|^2 with the per-channel symmetric
    round-to-nearest grid the quantizers use; columns follow
    sorted(bit_choices)."""
    choices = sorted(int(b) for b in bit_choices)
    return np.array([[float(jnp.sum((round_to_nearest(w, b) - w) ** 2)) for b in choices]
                     for w in kernels(model)])


def sensitivity_values(traces: np.ndarray, params: Sequence[int], perturbation: np.ndarray) -> np.ndarray:
    """Integer-program values (to maximise) = -Omega_l(b). A negative trace
    estimate (noise, or a saddle) counts as zero sensitivity."""
    traces = np.maximum(np.asarray(traces, np.float64), 0.0)
    params = np.asarray(params, np.float64)
    if traces.shape != params.shape or perturbation.shape[0] != len(params):
        raise ValueError(f"traces {traces.shape}, params {params.shape} and perturbation {perturbation.shape} "
                         f"must agree on the number of layers")
    return -(traces / params)[:, None] * perturbation
