"""The three block kinds of TRT-ViT (arXiv 2205.09579), Flax NNX, on NHWC maps.

- `BottleNeck`: ResNet's 1x1 -> 3x3 -> 1x1 block (the stride on the 3x3, as
  torchvision's ResNet v1.5), projection shortcut when the shape changes.
- `TransformerBlock`: pre-norm multi-head self-attention + MLP over the H*W
  tokens of a map. Keys and values come from a spatially reduced map (a
  strided conv with kernel = stride = `sr_ratio`, then LayerNorm), as in
  PVT (arXiv 2102.12122) and Next-ViT, so that early, high-resolution stages
  attend over few keys. The attention itself is `jax_fastattn.flash_attention`.
- `MixedBlock`: TRT-ViT's block: a 1x1 conv reduces the C channels to a
  C*r branch, a global module runs on it, a local module runs on the global
  module's output, the two outputs are concatenated back to C channels and
  added to the input. `order="global_local"` (Transformer then BottleNeck) is
  the paper's guideline 4; `"local_global"` is the controlled alternative.

`attention_reference` is the plain-JAX attention the Transformer block's
semantics are defined by (tests compare the block against it).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jax_fastattn import flash_attention

from ..layers import ConvBN

ATTENTION_BACKENDS = ("auto", "cuda", "cpu", "xla", "reference", "plain")
MIXED_ORDERS = ("global_local", "local_global")


def attention_reference(q, k, v):
    """softmax(q k^T / sqrt(D)) v in float32, layout [B, S, H, D]."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v.astype(jnp.float32)).astype(q.dtype)


def attend(q, k, v, backend: str):
    """Self-attention through flash_attention; "plain" is `attention_reference`
    (einsum + softmax, what ONNX exporters and XLA's cost analysis see
    through: a custom call counts no FLOPs and has no ONNX conversion)."""
    if backend == "plain":
        return attention_reference(q, k, v)
    return flash_attention(q, k, v, backend=backend)


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


class BottleNeck(nnx.Module):
    """1x1 (cin -> cout/expansion) -> 3x3 (stride) -> 1x1 (-> cout), + shortcut, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expansion: int = 4, *, rngs: nnx.Rngs):
        if cout % expansion:
            raise ValueError(f"cout ({cout}) must be a multiple of expansion ({expansion})")
        mid = cout // expansion
        self.reduce = ConvBN(cin, mid, 1, 1, rngs=rngs)
        self.spatial = ConvBN(mid, mid, 3, stride, rngs=rngs)
        self.expand = ConvBN(mid, cout, 1, 1, rngs=rngs)
        needs_projection = stride != 1 or cin != cout
        self.shortcut = ConvBN(cin, cout, 1, stride, is_shortcut=True, rngs=rngs) if needs_projection else None

    def __call__(self, x):
        y = jax.nn.relu(self.reduce(x))
        y = jax.nn.relu(self.spatial(y))
        y = self.expand(y)
        skip = x if self.shortcut is None else self.shortcut(x)
        return jax.nn.relu(y + skip)


class SpatialReductionAttention(nnx.Module):
    """Multi-head attention whose keys/values come from the map reduced by
    `sr_ratio` in each spatial direction (PVT's SRA); sr_ratio 1 = plain MHSA."""

    def __init__(self, dim: int, heads: int, sr_ratio: int = 1, attention_backend: str = "auto", *,
                 rngs: nnx.Rngs):
        if heads < 1 or dim % heads:
            raise ValueError(f"heads must divide dim ({dim}), got {heads}")
        if sr_ratio < 1:
            raise ValueError(f"sr_ratio must be >= 1, got {sr_ratio}")
        check_choice("attention_backend", attention_backend, ATTENTION_BACKENDS)
        self.heads, self.sr_ratio, self.attention_backend = heads, sr_ratio, attention_backend
        self.query = nnx.Linear(dim, dim, rngs=rngs)
        self.key_value = nnx.Linear(dim, 2 * dim, rngs=rngs)
        self.out = nnx.Linear(dim, dim, rngs=rngs)
        if sr_ratio > 1:
            self.reduce = nnx.Conv(dim, dim, (sr_ratio, sr_ratio), strides=(sr_ratio, sr_ratio),
                                   padding="VALID", rngs=rngs)
            self.reduce_norm = nnx.LayerNorm(dim, rngs=rngs)
        else:
            self.reduce = self.reduce_norm = None

    def __call__(self, tokens, hw):
        """tokens [B, N, C] (N = h*w when sr_ratio > 1) -> [B, N, C]."""
        b, n, c = tokens.shape
        q = self.query(tokens).reshape(b, n, self.heads, c // self.heads)
        source = tokens
        if self.reduce is not None:
            h, w = hw
            reduced = self.reduce(tokens.reshape(b, h, w, c))
            source = self.reduce_norm(reduced.reshape(b, -1, c))
        k, v = jnp.split(self.key_value(source), 2, axis=-1)
        k = k.reshape(b, -1, self.heads, c // self.heads)
        v = v.reshape(b, -1, self.heads, c // self.heads)
        return self.out(attend(q, k, v, self.attention_backend).reshape(b, n, c))


class TransformerBlock(nnx.Module):
    """x + SRA(LN(x)); x + MLP(LN(x)) (GELU, hidden = mlp_ratio * dim)."""

    def __init__(self, dim: int, heads: int, sr_ratio: int = 1, mlp_ratio: float = 4.0,
                 attention_backend: str = "auto", *, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attention = SpatialReductionAttention(dim, heads, sr_ratio, attention_backend, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        hidden = int(dim * mlp_ratio)
        self.fc1 = nnx.Linear(dim, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, rngs=rngs)

    def tokens(self, x, hw=None):
        """x [B, N, C] -> [B, N, C]."""
        x = x + self.attention(self.norm1(x), hw)
        return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x))))

    def __call__(self, x):
        """x [B, H, W, C] -> [B, H, W, C]."""
        b, h, w, c = x.shape
        return self.tokens(x.reshape(b, h * w, c), (h, w)).reshape(b, h, w, c)


class MixedBlock(nnx.Module):
    """TRT-ViT's mixed block: reduce C -> C*r, global then local module (or
    the reverse), concat both outputs back to C, add the input.

    global_local: t = Transformer(reduce(x)), l = BottleNeck(t): C*r -> C - C*r
    local_global: l = BottleNeck(reduce(x)): C*r -> C*r, t = Transformer(l)
    (the second needs C*r == C - C*r, i.e. r = 0.5, so that both orders have
    the same parameters and FLOPs).
    """

    def __init__(self, dim: int, heads: int, sr_ratio: int = 1, mlp_ratio: float = 4.0,
                 transformer_ratio: float = 0.5, order: str = "global_local", attention_backend: str = "auto",
                 bottleneck_expansion: int = 4, *, rngs: nnx.Rngs):
        check_choice("order", order, MIXED_ORDERS)
        branch = int(round(dim * transformer_ratio))
        if not 0 < branch < dim:
            raise ValueError(f"transformer_ratio must leave both branches channels, got {transformer_ratio}")
        if order == "local_global" and 2 * branch != dim:
            raise ValueError(f"order='local_global' needs transformer_ratio 0.5, got {transformer_ratio}")
        self.order = order
        self.reduce = ConvBN(dim, branch, 1, 1, rngs=rngs)
        self.transformer = TransformerBlock(branch, heads, sr_ratio, mlp_ratio, attention_backend, rngs=rngs)
        self.bottleneck = BottleNeck(branch, dim - branch, 1, bottleneck_expansion, rngs=rngs)

    def __call__(self, x):
        y = self.reduce(x)
        if self.order == "global_local":
            first = self.transformer(y)
            second = self.bottleneck(first)
        else:
            first = self.bottleneck(y)
            second = self.transformer(first)
        return x + jnp.concatenate([first, second], axis=-1)


def attention_layers(model: nnx.Module) -> list:
    """Every SpatialReductionAttention inside `model`, in graph order."""
    modules = nnx.iter_modules(model) if hasattr(nnx, "iter_modules") else model.iter_modules()
    return [module for _, module in modules if isinstance(module, SpatialReductionAttention)]


def set_attention_backend(model: nnx.Module, backend: str) -> nnx.Module:
    """Points every attention layer of `model` at `backend` (in place)."""
    check_choice("backend", backend, ATTENTION_BACKENDS)
    for layer in attention_layers(model):
        layer.attention_backend = backend
    return model
