"""MobileNetV2 (Sandler et al. 2018) for small inputs, Flax NNX: stem and
the first stride-2 stage at stride 1 (the CIFAR variant), ReLU6.

`__call__(x, collect=True)` also returns every quantizable layer's output
(before its activation), in the order of `quantizable_layers`.
"""
from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from .layers import ConvBN, layer_costs as _layer_costs

# (expansion t, channels c, repeats n, first stride s), as in the paper,
# with the second stage's stride 2 -> 1 for 32x32 inputs.
STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
          (6, 320, 1, 1))


class InvertedResidual(nnx.Module):
    def __init__(self, cin: int, cout: int, stride: int, expansion: int, *, rngs: nnx.Rngs):
        hidden = cin * expansion
        self.expand = ConvBN(cin, hidden, 1, 1, rngs=rngs) if expansion != 1 else None
        self.depthwise = ConvBN(hidden, hidden, 3, stride, groups=hidden, rngs=rngs)
        self.project = ConvBN(hidden, cout, 1, 1, rngs=rngs)
        self.residual = stride == 1 and cin == cout

    def layers(self) -> list:
        return ([self.expand] if self.expand is not None else []) + [self.depthwise, self.project]

    def __call__(self, x, outputs: list):
        y = x
        if self.expand is not None:
            y = self.expand(y)
            outputs.append(y)
            y = jax.nn.relu6(y)
        y = self.depthwise(y)
        outputs.append(y)
        y = self.project(jax.nn.relu6(y))
        outputs.append(y)  # linear bottleneck: no activation
        return x + y if self.residual else y


class MobileNetV2(nnx.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0, stage2_stride: int = 1, *,
                 rngs: nnx.Rngs):
        """stage2_stride=2 restores the paper's stride in the second stage
        (28x28 MNIST then ends at 2x2 and costs a quarter as much in the
        early stages, which matters on a CPU: XLA's depthwise convolution
        there is slow)."""
        scaled = lambda c: max(8, int(c * width + 4) // 8 * 8)
        self.stem = ConvBN(in_channels, scaled(32), 3, 1, rngs=rngs)
        blocks, cin = [], scaled(32)
        for stage, (expansion, channels, repeats, stride) in enumerate(STAGES):
            stride = stage2_stride if stage == 1 else stride
            for i in range(repeats):
                blocks.append(InvertedResidual(cin, scaled(channels), stride if i == 0 else 1, expansion, rngs=rngs))
                cin = scaled(channels)
        self.blocks = nnx.List(blocks) if hasattr(nnx, "List") else blocks
        self.last = ConvBN(cin, 1280, 1, 1, rngs=rngs)
        self.head = nnx.Linear(1280, num_classes, rngs=rngs)

    def quantizable_layers(self) -> list:
        layers = [self.stem]
        for block in self.blocks:
            layers += block.layers()
        return layers + [self.last, self.head]

    def __call__(self, x, collect: bool = False):
        outputs = []
        y = self.stem(x)
        outputs.append(y)
        y = jax.nn.relu6(y)
        for block in self.blocks:
            y = block(y, outputs)
        y = self.last(y)
        outputs.append(y)
        logits = self.head(jnp.mean(jax.nn.relu6(y), axis=(1, 2)))
        outputs.append(logits[:, None, None, :])
        return (logits, outputs) if collect else logits


def layer_costs(model: MobileNetV2, image_hw: Tuple[int, int]) -> Tuple[list, list]:
    """(params, FLOPs per image) of each quantizable layer, in order."""
    return _layer_costs(model.quantizable_layers(), image_hw)
