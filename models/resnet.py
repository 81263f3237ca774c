"""ResNet-18 with a small-input stem (3x3 conv, no max-pool), Flax NNX.

`__call__(x, collect=True)` also returns every quantizable layer's output
(before its ReLU), in the order of `quantizable_layers`, which CSMPQ scores.
"""
from __future__ import annotations

from typing import List, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from .layers import ConvBN, layer_costs as _layer_costs


class BasicBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs):
        self.first = ConvBN(cin, cout, 3, stride, rngs=rngs)
        self.second = ConvBN(cout, cout, 3, 1, rngs=rngs)
        needs_projection = stride != 1 or cin != cout
        self.shortcut = ConvBN(cin, cout, 1, stride, is_shortcut=True, rngs=rngs) if needs_projection else None

    def layers(self) -> List[ConvBN]:
        return [self.first, self.second] + ([self.shortcut] if self.shortcut is not None else [])

    def __call__(self, x, outputs: list):
        y = self.first(x)
        outputs.append(y)
        y = self.second(jax.nn.relu(y))
        outputs.append(y)
        skip = x
        if self.shortcut is not None:
            skip = self.shortcut(x)
            outputs.append(skip)
        return jax.nn.relu(y + skip)


class ResNet18(nnx.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0, *, rngs: nnx.Rngs):
        # width scales every stage (0.25 -> 16..128 channels) so that the
        # CSMPQ experiments train on a 2-core CPU; 1.0 is the paper's net.
        widths = tuple(max(8, int(c * width)) for c in (64, 128, 256, 512))
        strides = (1, 2, 2, 2)
        self.stem = ConvBN(in_channels, widths[0], 3, 1, rngs=rngs)
        blocks, cin = [], widths[0]
        for width, stride in zip(widths, strides):
            blocks += [BasicBlock(cin, width, stride, rngs=rngs), BasicBlock(width, width, 1, rngs=rngs)]
            cin = width
        self.blocks = nnx.List(blocks) if hasattr(nnx, "List") else blocks
        self.head = nnx.Linear(widths[-1], num_classes, rngs=rngs)

    def quantizable_layers(self) -> list:
        """Stem, every conv of every block (shortcuts included), the head."""
        layers = [self.stem]
        for block in self.blocks:
            layers += block.layers()
        return layers + [self.head]

    def __call__(self, x, collect: bool = False):
        outputs = []
        y = self.stem(x)
        outputs.append(y)
        y = jax.nn.relu(y)
        for block in self.blocks:
            y = block(y, outputs)
        logits = self.head(jnp.mean(y, axis=(1, 2)))
        outputs.append(logits[:, None, None, :])
        return (logits, outputs) if collect else logits


def layer_costs(model: ResNet18, image_hw: Tuple[int, int]) -> Tuple[list, list]:
    """(params, FLOPs per image) of each quantizable layer, in order."""
    return _layer_costs(model.quantizable_layers(), image_hw)
