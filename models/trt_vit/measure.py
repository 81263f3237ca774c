"""Parameters, FLOPs (XLA cost analysis) and latency of an NNX model.

FLOPs come from `jax.jit(...).lower(...).cost_analysis()` of the model with
its attention switched to plain einsum + softmax ("plain"): XLA counts no
FLOPs inside a custom call, so the fused kernel would hide the attention's
matmuls. Latency is measured on the model as deployed (attention through
`flash_attention`, backend "auto"), as device time per forward of
back-to-back calls (see `latency`).
"""
from __future__ import annotations

import time
from typing import Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_fastattn.bench.timing import sample_seconds

from .blocks import attention_layers, set_attention_backend


def count_params(model: nnx.Module) -> int:
    """Trainable parameters (nnx.Param; batch-norm statistics excluded).
    Works on abstract models from nnx.eval_shape too."""
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param))))


def _forward(graphdef):
    def forward(state, x):
        return nnx.merge(graphdef, state)(x)
    return forward


def _abstract(tree, sharding=None):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def xla_flops(model: nnx.Module, input_shape, dtype=jnp.float32) -> float:
    """FLOPs of one forward pass on an input of `input_shape`, by XLA's cost
    analysis of the lowered (unoptimised) HLO, attention as plain einsums.
    The program is lowered for the host CPU whatever the default device:
    FLOPs do not depend on the device, and the GPU client gives no cost
    analysis before compiling (compiling there would autotune every GEMM).
    The model's attention backends are restored afterwards."""
    saved = [layer.attention_backend for layer in attention_layers(model)]
    set_attention_backend(model, "plain")
    try:
        graphdef, state = nnx.split(model)
        host = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
        lowered = jax.jit(_forward(graphdef)).lower(
            _abstract(state, host), jax.ShapeDtypeStruct(tuple(input_shape), dtype, sharding=host))
        cost = lowered.cost_analysis()
        if cost is None:  # a jax without cost analysis of lowered modules
            cost = lowered.compile().cost_analysis()
    finally:
        for layer, backend in zip(attention_layers(model), saved):
            layer.attention_backend = backend
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0]
    return float(cost["flops"])


def cast_state(model: nnx.Module, dtype):
    """(graphdef, state) with every floating array cast to `dtype`."""
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, state)
    return graphdef, state


def latency(model: nnx.Module, input_shape, dtype, *, warmup: int = 10, repeats: int = 100,
            calls: int = 10, clock: Callable[[], float] = time.perf_counter) -> Dict[str, float]:
    """Per-forward time (ms) of one jitted forward in `dtype` (weights and
    input) on the device: `repeats` samples, each `calls` forwards
    dispatched back to back and waited for once (as a serving loop or
    TensorRT's GPU compute time sees them), after `warmup` calls (the first
    compiles; compile time reported apart). Median, p10 and p90 over the
    samples. The weights are handed to the jitted function as a flat list
    of arrays, so dispatch stays in jax's C++ path instead of flattening an
    NNX state in Python (milliseconds for a deep model), and `dispatch_ms`
    records one isolated call timed to completion, host dispatch included."""
    if repeats < 1 or warmup < 1 or calls < 1:
        raise ValueError(f"warmup, repeats and calls must be >= 1, got {warmup}, {repeats}, {calls}")
    model.eval()
    graphdef, state = cast_state(model, dtype)
    leaves, treedef = jax.tree.flatten(state)
    run = _forward(graphdef)
    forward = jax.jit(lambda leaves, x: run(jax.tree.unflatten(treedef, leaves), x))
    x = jnp.asarray(np.random.default_rng(0).standard_normal(input_shape), dtype)
    start = clock()
    forward(leaves, x).block_until_ready()
    compile_s = clock() - start
    for _ in range(warmup - 1):
        forward(leaves, x).block_until_ready()
    start = clock()
    forward(leaves, x).block_until_ready()
    dispatch_ms = 1e3 * (clock() - start)
    times, _ = sample_seconds(lambda: forward(leaves, x), jax.block_until_ready, repeats, calls, clock)
    times_ms = 1e3 * np.asarray(times)
    return {"median_ms": float(np.median(times_ms)), "p10_ms": float(np.percentile(times_ms, 10)),
            "p90_ms": float(np.percentile(times_ms, 90)), "compile_s": float(compile_s), "repeats": repeats,
            "calls_per_sample": calls, "dispatch_ms": float(dispatch_ms)}
