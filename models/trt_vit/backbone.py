"""A four-stage backbone configured per stage (block kind, depth, channels,
stride, heads, spatial reduction), and the TRT-ViT A-D variants.

One `Backbone` class builds TRT-ViT, ResNet-50/101/152 (all-BottleNeck
stages) and the PVT-style pure-Transformer pyramid, so that the latency
harness compares the same code paths. Design reasoning and per-stage tables:
docs/TRT_VIT.md.
"""
from __future__ import annotations

import dataclasses
from typing import Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from ..layers import ConvBN
from .blocks import ATTENTION_BACKENDS, BottleNeck, MixedBlock, TransformerBlock, check_choice

BLOCK_KINDS = ("bottleneck", "transformer", "mixed", "mixed_local_first")
STEMS = ("resnet", "patch4", "small")


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One stage: `depth` blocks of `kind` at `channels` output channels; the
    first block (bottleneck) or a patch-merging conv (attention kinds)
    applies `stride`. Attention heads = attention channels // head_dim
    (the Transformer branch of a mixed block has channels * 0.5)."""
    kind: str
    depth: int
    channels: int
    stride: int
    sr_ratio: int = 1
    mlp_ratio: float = 4.0

    def __post_init__(self):
        check_choice("kind", self.kind, BLOCK_KINDS)
        for name in ("depth", "channels", "stride", "sr_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
    name: str
    stages: Tuple[StageSpec, ...]
    stem: str = "resnet"          # resnet: 7x7/2 conv + 3x3/2 max-pool; patch4: 4x4/4 conv; small: 3x3/1 conv
    stem_channels: int = 64
    head_dim: int = 64            # 64: the smallest head dim the GPU kernels run without zero padding
    num_classes: int = 1000
    in_channels: int = 3
    attention_backend: str = "auto"

    def __post_init__(self):
        check_choice("stem", self.stem, STEMS)
        check_choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        if len(self.stages) < 1:
            raise ValueError("stages must hold at least one StageSpec")
        for spec in self.stages:
            width = spec.channels // 2 if spec.kind.startswith("mixed") else spec.channels
            if spec.kind != "bottleneck" and width % self.head_dim:
                raise ValueError(f"stage channels of {self.name} ({spec.kind}, {spec.channels}) must give an "
                                 f"attention width divisible by head_dim {self.head_dim}")

    def replace(self, **changes) -> "BackboneConfig":
        return dataclasses.replace(self, **changes)

    def scaled(self, width: float, name: str | None = None) -> "BackboneConfig":
        """Every stage's channels times `width`, rounded to the attention
        granularity (2 * head_dim covers a mixed block's half branch and the
        BottleNeck's expansion 4 when head_dim is a multiple of 2)."""
        unit = 2 * self.head_dim
        stages = tuple(dataclasses.replace(s, channels=max(unit, int(round(s.channels * width / unit)) * unit))
                       for s in self.stages)
        return dataclasses.replace(self, name=name or self.name, stages=stages,
                                   stem_channels=max(8, int(round(self.stem_channels * width / 8)) * 8))


def _make_block(spec: StageSpec, cin: int, stride: int, cfg: BackboneConfig, rngs: nnx.Rngs):
    if spec.kind == "bottleneck":
        return BottleNeck(cin, spec.channels, stride, rngs=rngs)
    if spec.kind == "transformer":
        return TransformerBlock(spec.channels, spec.channels // cfg.head_dim, spec.sr_ratio, spec.mlp_ratio,
                                cfg.attention_backend, rngs=rngs)
    order = "global_local" if spec.kind == "mixed" else "local_global"
    return MixedBlock(spec.channels, spec.channels // 2 // cfg.head_dim, spec.sr_ratio, spec.mlp_ratio,
                      0.5, order, cfg.attention_backend, rngs=rngs)


class Stage(nnx.Module):
    def __init__(self, spec: StageSpec, cin: int, cfg: BackboneConfig, *, rngs: nnx.Rngs):
        # Attention stages change resolution/width with a patch-merging conv
        # first (kernel = stride, + BN: PVT's patch embedding); bottleneck
        # stages put the stride in their first block, as ResNet.
        blocks, width = [], cin
        merge = None
        if spec.kind != "bottleneck" and (spec.stride != 1 or cin != spec.channels):
            merge = ConvBN(cin, spec.channels, spec.stride, spec.stride, rngs=rngs)
            width = spec.channels
        self.merge = merge
        for index in range(spec.depth):
            stride = spec.stride if (index == 0 and spec.kind == "bottleneck") else 1
            blocks.append(_make_block(spec, width, stride, cfg, rngs))
            width = spec.channels
        self.blocks = nnx.List(blocks)

    def __call__(self, x):
        if self.merge is not None:
            x = self.merge(x)
        for block in self.blocks:
            x = block(x)
        return x


class Backbone(nnx.Module):
    """stem -> stages -> global average pool -> (LayerNorm if the last stage
    attends) -> linear classifier. Input NHWC, output logits."""

    def __init__(self, cfg: BackboneConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        if cfg.stem == "resnet":
            self.stem = ConvBN(cfg.in_channels, cfg.stem_channels, 7, 2, rngs=rngs)
        elif cfg.stem == "patch4":
            self.stem = ConvBN(cfg.in_channels, cfg.stem_channels, 4, 4, rngs=rngs)
        else:
            self.stem = ConvBN(cfg.in_channels, cfg.stem_channels, 3, 1, rngs=rngs)
        stages, width = [], cfg.stem_channels
        for spec in cfg.stages:
            stages.append(Stage(spec, width, cfg, rngs=rngs))
            width = spec.channels
        self.stages = nnx.List(stages)
        self.head_norm = nnx.LayerNorm(width, rngs=rngs) if cfg.stages[-1].kind != "bottleneck" else None
        self.head = nnx.Linear(width, cfg.num_classes, rngs=rngs)

    def features(self, x):
        y = jax.nn.relu(self.stem(x))
        if self.cfg.stem == "resnet":
            y = nnx.max_pool(y, (3, 3), strides=(2, 2), padding="SAME")
        for stage in self.stages:
            y = stage(y)
        return y

    def __call__(self, x):
        pooled = jnp.mean(self.features(x), axis=(1, 2))
        if self.head_norm is not None:
            pooled = self.head_norm(pooled)
        return self.head(pooled)


def _stages(*rows) -> Tuple[StageSpec, ...]:
    return tuple(StageSpec(*row) for row in rows)


# TRT-ViT A-D, designed from the paper's four guidelines (the paper's own
# per-stage table is not reproduced here; docs/TRT_VIT.md gives the
# reasoning): BottleNeck stages early and shallow (guidelines 1, 2), mixed
# blocks, Transformer first, late and deep (3, 4); stride 4/8/16/32 like
# ResNet, so that the 14x14 and 7x7 maps hold 196 and 49 tokens; keys and
# values of the 14x14 stage reduced 2x2 (49 keys).
#   (kind, depth, channels, stride, sr_ratio, mlp_ratio)
VARIANTS = {
    "A": BackboneConfig("TRT-ViT-A", _stages(("bottleneck", 1, 256, 1), ("bottleneck", 2, 512, 2),
                                             ("mixed", 6, 768, 2, 2, 3.0), ("mixed", 2, 1024, 2, 1, 3.0))),
    "B": BackboneConfig("TRT-ViT-B", _stages(("bottleneck", 2, 256, 1), ("bottleneck", 3, 512, 2),
                                             ("mixed", 9, 768, 2, 2, 3.0), ("mixed", 3, 1024, 2, 1, 3.0))),
    "C": BackboneConfig("TRT-ViT-C", _stages(("bottleneck", 3, 256, 1), ("bottleneck", 4, 512, 2),
                                             ("mixed", 12, 768, 2, 2, 3.0), ("mixed", 4, 1024, 2, 1, 3.0))),
    "D": BackboneConfig("TRT-ViT-D", _stages(("bottleneck", 3, 256, 1), ("bottleneck", 4, 512, 2),
                                             ("mixed", 14, 1024, 2, 2, 3.0), ("mixed", 4, 1280, 2, 1, 3.0))),
}


def trt_vit(variant: str, *, rngs: nnx.Rngs, **overrides) -> Backbone:
    """TRT-ViT-A..D; `overrides` replace BackboneConfig fields (num_classes,
    in_channels, attention_backend...)."""
    check_choice("variant", variant, tuple(VARIANTS))
    return Backbone(VARIANTS[variant].replace(**overrides), rngs=rngs)


def tiny_config(variant: str = "A", *, width: float = 0.125, num_classes: int = 10, in_channels: int = 1,
                head_dim: int = 16, max_depth: int | None = None, attention_backend: str = "auto") -> BackboneConfig:
    """A narrow copy of a variant for 28x28 images on a CPU: stem 3x3/1 (no
    down-sampling), channels times `width`, head_dim 16, same kinds,
    strides and sr ratios as the full variant, depths capped at `max_depth`
    (None: the variant's)."""
    check_choice("variant", variant, tuple(VARIANTS))
    if max_depth is not None and max_depth < 1:
        raise ValueError(f"max_depth must be >= 1 or None, got {max_depth}")
    base = VARIANTS[variant].replace(head_dim=head_dim, stem="small", num_classes=num_classes,
                                     in_channels=in_channels, attention_backend=attention_backend)
    if max_depth is not None:
        base = base.replace(stages=tuple(dataclasses.replace(s, depth=min(s.depth, max_depth))
                                         for s in base.stages))
    return base.scaled(width, name=f"{base.name}-tiny")
