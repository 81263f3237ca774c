"""Fake quantization (quantize -> dequantize in float, straight-through
gradients) through qwix's OdmlQatProvider.

Why qwix and this provider: qwix is the maintained JAX quantization library
and its rules give per-module bit-widths (int2 ... int8) without touching the
model code. Its QtProvider computes in real low-bit integers, which XLA:CPU
rejects below 8 bits; OdmlQatProvider fakes the quantization in float, with
per-output-channel symmetric weights (scale = absmax / (2^(b-1) - 0.5)) and
per-tensor activations whose ranges are running averages over the batches
seen while statistics are enabled. Every op output (conv, batch norm, ReLU,
add, pooling) is an activation at `activation_bits`, as in a fully
integer deployment.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

from ..layers import ConvBN


def layer_paths(model: nnx.Module) -> list:
    """qwix module path ('blocks/0/first/conv') of the weight op of each
    quantizable layer, in `model.quantizable_layers()` order."""
    path_of = {id(module): "/".join(map(str, path)) for path, module in model.iter_modules()}
    ops = [layer.conv if isinstance(layer, ConvBN) else layer for layer in model.quantizable_layers()]
    return [path_of[id(op)] for op in ops]


def _qtype(bits: int) -> str:
    if not 2 <= int(bits) <= 8:
        raise ValueError(f"bit-widths must be in [2, 8] for qwix's integer qtypes, got {bits}")
    return f"int{int(bits)}"


def quantization_rules(paths: Sequence[str], weight_bits: Optional[Sequence[int]], activation_bits: int) -> list:
    """One rule per quantizable layer (its weight bits), then a catch-all rule
    quantizing every other op's output. weight_bits=None leaves weights in
    float (used after AdaRound has already put them on their grid)."""
    rules = []
    if weight_bits is not None:
        if len(weight_bits) != len(paths):
            raise ValueError(f"weight_bits has {len(weight_bits)} entries for {len(paths)} quantizable layers")
        rules = [qwix.QuantizationRule(module_path=path, weight_qtype=_qtype(b), act_qtype=_qtype(activation_bits))
                 for path, b in zip(paths, weight_bits)]
    return rules + [qwix.QuantizationRule(module_path=".*", act_qtype=_qtype(activation_bits))]


def fake_quantized(model: nnx.Module, weight_bits: Optional[Sequence[int]], activation_bits: int,
                   sample: np.ndarray) -> nnx.Module:
    """A fake-quantized copy of `model` (the original is left as it is).
    `sample` is one input batch (qwix traces the model with it once)."""
    rules = quantization_rules(layer_paths(model), weight_bits, activation_bits)
    # strict=False: batch norm reads its running statistics, which qwix sees
    # as neither weights nor activations; they stay in float (they fold
    # into the conv at deployment).

    return qwix.quantize_model(nnx.clone(model), qwix.OdmlQatProvider(rules, strict=False), jnp.asarray(sample))


def freeze_activation_ranges(model: nnx.Module, frozen: bool = True) -> None:
    """Stop (or restart) the running averages of activation ranges, e.g.
    before evaluation so that test data does not calibrate the model."""
    model.set_attributes(disable_quant_stats_update=frozen, raise_if_not_found=False)
