"""Baselines in the same code as TRT-ViT: ResNet-50/101/152 (all-BottleNeck
`Backbone`s), a PVT-style pure-Transformer pyramid (PVT-Small's stage
shapes, arXiv 2102.12122) and ViT-S/16 (DeiT-S's shape, arXiv 2012.12877)."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from .backbone import Backbone, BackboneConfig, StageSpec
from .blocks import ATTENTION_BACKENDS, TransformerBlock, check_choice


def _resnet(name: str, depths) -> BackboneConfig:
    # torchvision's ResNet: outputs 256/512/1024/2048, bottleneck width /4.
    channels, strides = (256, 512, 1024, 2048), (1, 2, 2, 2)
    return BackboneConfig(name, tuple(StageSpec("bottleneck", d, c, s) for d, c, s in zip(depths, channels, strides)))


RESNETS = {
    "resnet50": _resnet("ResNet-50", (3, 4, 6, 3)),
    "resnet101": _resnet("ResNet-101", (3, 4, 23, 3)),
    "resnet152": _resnet("ResNet-152", (3, 8, 36, 3)),
}

# PVT-Small: channels 64/128/320/512, depths 3/4/6/3, heads 1/2/5/8 (head dim
# 64), spatial reduction 8/4/2/1, MLP ratio 8/8/4/4, 4x4/4 patch stem.
PVT_SMALL = BackboneConfig(
    "PVT-style-S",
    (StageSpec("transformer", 3, 64, 1, 8, 8.0), StageSpec("transformer", 4, 128, 2, 4, 8.0),
     StageSpec("transformer", 6, 320, 2, 2, 4.0), StageSpec("transformer", 3, 512, 2, 1, 4.0)),
    stem="patch4", stem_channels=64)


class ViT(nnx.Module):
    """Isotropic ViT: patch conv, class token, learned positions, `depth`
    pre-norm Transformer blocks, LayerNorm, linear head on the class token."""

    def __init__(self, *, image_size: int = 224, patch: int = 16, dim: int = 384, depth: int = 12, heads: int = 6,
                 mlp_ratio: float = 4.0, num_classes: int = 1000, in_channels: int = 3,
                 attention_backend: str = "auto", rngs: nnx.Rngs):
        check_choice("attention_backend", attention_backend, ATTENTION_BACKENDS)
        if image_size % patch:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch ({patch})")
        tokens = (image_size // patch) ** 2 + 1
        self.image_size = image_size
        self.patch_embed = nnx.Conv(in_channels, dim, (patch, patch), strides=(patch, patch), padding="VALID",
                                    rngs=rngs)
        self.class_token = nnx.Param(jnp.zeros((1, 1, dim)))
        self.positions = nnx.Param(0.02 * nnx.initializers.truncated_normal()(rngs.params(), (1, tokens, dim)))
        self.blocks = nnx.List([TransformerBlock(dim, heads, 1, mlp_ratio, attention_backend, rngs=rngs)
                                for _ in range(depth)])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, num_classes, rngs=rngs)

    def __call__(self, x):
        if x.shape[1] != self.image_size or x.shape[2] != self.image_size:
            raise ValueError(f"x must be [B, {self.image_size}, {self.image_size}, C], got {x.shape}")
        patches = self.patch_embed(x)
        b, h, w, c = patches.shape
        tokens = patches.reshape(b, h * w, c)
        cls = jnp.broadcast_to(self.class_token[...].astype(tokens.dtype), (b, 1, c))
        tokens = jnp.concatenate([cls, tokens], axis=1) + self.positions[...].astype(tokens.dtype)
        for block in self.blocks:
            tokens = block.tokens(tokens)
        return self.head(self.norm(tokens[:, 0]))


def vit_small(*, rngs: nnx.Rngs, **kwargs) -> ViT:
    """ViT-S/16 (DeiT-S): dim 384, 12 blocks, 6 heads of 64, MLP 1536."""
    return ViT(rngs=rngs, **kwargs)


def build(name: str, *, rngs: nnx.Rngs, **overrides) -> nnx.Module:
    """A baseline by name: resnet50, resnet101, resnet152, pvt, vit_s."""
    if name in RESNETS:
        return Backbone(RESNETS[name].replace(**overrides), rngs=rngs)
    if name == "pvt":
        return Backbone(PVT_SMALL.replace(**overrides), rngs=rngs)
    if name == "vit_s":
        return vit_small(rngs=rngs, **overrides)
    raise ValueError(f"name must be one of {tuple(RESNETS) + ('pvt', 'vit_s')}, got {name!r}")
