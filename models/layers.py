"""Layers shared by the CNNs in models/: conv + batch norm, and the cost
(parameters, FLOPs) of every quantizable layer."""
from __future__ import annotations

from typing import Sequence, Tuple

from flax import nnx


class ConvBN(nnx.Module):
    """conv -> batch norm (the activation, if any, is the caller's)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, groups: int = 1, *,
                 is_shortcut: bool = False, rngs: nnx.Rngs):
        self.conv = nnx.Conv(cin, cout, (kernel, kernel), strides=(stride, stride), padding="SAME",
                             feature_group_count=groups, use_bias=False, rngs=rngs)
        # momentum 0.9: the running statistics must settle within a few
        # hundred steps (the CPU training runs are short).
        self.norm = nnx.BatchNorm(cout, use_running_average=True, momentum=0.9, rngs=rngs)
        self.kernel, self.cin, self.cout, self.stride, self.groups = kernel, cin, cout, stride, groups
        # A shortcut runs beside the main path: it does not move the
        # running spatial size in layer_costs.
        self.is_shortcut = is_shortcut

    def __call__(self, x):
        return self.norm(self.conv(x))


def layer_costs(layers: Sequence[nnx.Module], image_hw: Tuple[int, int]) -> Tuple[list, list]:
    """(params, FLOPs per image) of each layer, in network order: ConvBN
    layers track the spatial size through their strides; nnx.Linear heads
    count in_features * out_features."""
    params, flops = [], []
    h, w = image_hw
    for layer in layers:
        if isinstance(layer, ConvBN):
            count = layer.kernel * layer.kernel * (layer.cin // layer.groups) * layer.cout
            if not layer.is_shortcut:
                h, w = -(-h // layer.stride), -(-w // layer.stride)
            # A shortcut is listed after its block's main path, whose strided
            # conv already brought the size to the block's output size.
            params.append(count)
            flops.append(2.0 * count * h * w)
        else:
            count = layer.in_features * layer.out_features
            params.append(count)
            flops.append(2.0 * count)
    return params, flops
