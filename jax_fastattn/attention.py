"""flash_attention(): argument checks, backend choice and the custom_vjp that
ties forward and backward kernels together."""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import blockwise, ffi, masks, reference, sharding
from .config import CPU_TILES, CUDA_TILES, VOLTA_TILES, XLA_TILES, TileConfig

BACKENDS = ("auto", "cuda", "volta", "cpu", "xla", "reference")
_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
MAX_HEAD_DIM = 256


def _dtype_name(x) -> str:
    return str(jnp.result_type(x))


def check_inputs(q, k, v, bias, softmax_scale) -> None:
    """Raises ValueError/TypeError naming the bad argument."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"{name} must have rank 4 [B, S, H, D], got shape {tuple(x.shape)}")
        if jnp.result_type(x) not in [jnp.dtype(d) for d in _FLOAT_DTYPES]:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {_dtype_name(x)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B, Skv, Hkv, D], got {k.shape} and {v.shape}")
    b, sq, hq, d = q.shape
    if k.shape[0] != b:
        raise ValueError(f"k/v batch ({k.shape[0]}) must equal q batch ({b})")
    if k.shape[3] != d:
        raise ValueError(f"k/v head dim ({k.shape[3]}) must equal q head dim ({d})")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D must be in [1, {MAX_HEAD_DIM}], got {d}")
    if sq < 1 or k.shape[1] < 1 or b < 1:
        raise ValueError(f"batch and sequence lengths must be >= 1, got q {q.shape}, k {k.shape}")
    hkv = k.shape[2]
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hkv}) (MHA, GQA or MQA)")
    if bias is not None:
        shape = tuple(np.shape(bias))
        ok = (len(shape) == 4 and shape[0] in (1, b) and shape[1] in (1, hq)
              and shape[2] == sq and shape[3] == k.shape[1])
        if not ok:
            raise ValueError(
                f"bias must have shape [B|1, H|1, Sq, Skv] with B={b}, H={hq}, Sq={sq}, Skv={k.shape[1]}; "
                f"got {shape}")
        if not jnp.issubdtype(jnp.result_type(bias), jnp.floating):
            raise TypeError(f"bias must be a float array, got {_dtype_name(bias)}")
    if softmax_scale is not None:
        if isinstance(softmax_scale, jax.core.Tracer) or not isinstance(softmax_scale, (int, float, np.floating)) \
                or isinstance(softmax_scale, bool):
            raise TypeError(f"softmax_scale must be a Python float, got {type(softmax_scale).__name__}")
        if not math.isfinite(float(softmax_scale)):
            raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")


# CUDA kernels this release has, per operation.
_CUDA_TARGETS = {"attention": "fastattn_forward_cuda", "decode": "fastattn_decode_cuda"}
_VOLTA_TARGET = "fastattn_forward_volta"
# Head dims the GPU attention kernels are built for; smaller ones are zero-padded up.
KERNEL_HEAD_DIMS = {"volta": (64, 128), "cuda": (64, 128, 256)}
# Head dims the CUDA backward kernels take; above, the backward is blockwise JAX.
CUDA_BACKWARD_MAX_HEAD_DIM = 128
KERNEL_DTYPES = {"volta": (jnp.float16,), "cuda": (jnp.bfloat16, jnp.float16)}


def _is_volta(device) -> bool:
    return getattr(device, "compute_capability", None) == "7.0"


def resolve_backend(backend: str, op: str = "attention") -> str:
    """'auto' -> the concrete backend for the default device; checks others."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    has_cuda_kernel = _CUDA_TARGETS[op] in ffi.cuda_targets()
    has_volta_kernel = op == "attention" and _VOLTA_TARGET in ffi.cuda_targets()
    if backend in ("cuda", "volta"):
        if not ffi.gpu_available():
            raise ValueError(f"backend={backend!r} needs a CUDA GPU, but JAX sees none "
                             f"(devices: {[d.platform for d in jax.devices()]}); use 'cpu' or 'xla'")
        if backend == "volta":
            if not has_volta_kernel:
                raise ValueError(f"backend='volta' has no kernel for {op} in this build (the Volta kernel "
                                 "is the attention forward; it is built with nvcc and NVRTC 12 present)")
            return "volta"
        if not has_cuda_kernel:
            raise ValueError(f"backend={backend!r}: this build has no CUDA kernel for {op} yet "
                             "(built without nvcc, or not implemented); use 'xla'")
        return "cuda"
    if backend == "cpu" and not ffi.library_available():
        raise ValueError("backend='cpu' needs the compiled library; build it with `pip install -e .`")
    if backend == "auto":
        platform = jax.devices()[0].platform
        if platform == "cpu" and ffi.library_available():
            return "cpu"
        if platform == "gpu" and has_volta_kernel and _is_volta(jax.devices()[0]):
            return "volta"
        if platform == "gpu" and has_cuda_kernel:
            return "cuda"
        return "xla"  # documented: GPU attention uses the pure-JAX backend until its CUDA kernels land
    return backend


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything static about one call (hashable: a custom_vjp nondiff arg)."""

    backend: str
    softmax_scale: float
    q_len: int
    kv_len: int
    band_lo: int
    band_hi: int
    tiles: TileConfig

    def plan(self, q_ids, kv_ids, dense) -> masks.MaskPlan:
        return masks.MaskPlan(self.q_len, self.kv_len, self.band_lo, self.band_hi, q_ids, kv_ids, dense)

    def attrs(self) -> ffi.CallAttrs:
        return ffi.CallAttrs(self.softmax_scale, self.band_lo, self.band_hi, self.tiles.tile_q, self.tiles.tile_kv)


def _or_absent(x, dtype):
    return ffi.absent(dtype) if x is None else x


def _pad_head_dim(backend: str, *arrays):
    """Zero-pads the head dim up to the kernel's (changes no score, and the
    padded columns of out and of every gradient are zero)."""
    head_dim = arrays[0].shape[-1]
    padded = next(d for d in KERNEL_HEAD_DIMS[backend] if d >= head_dim)
    return tuple(jnp.pad(x, ((0, 0),) * 3 + ((0, padded - head_dim),)) for x in arrays)


def _forward(static: _Static, q, k, v, bias, q_ids, kv_ids, dense):
    plan = static.plan(q_ids, kv_ids, dense)
    if static.backend == "xla":
        return blockwise.forward(q, k, v, bias, plan, static.softmax_scale, static.tiles.tile_q, static.tiles.tile_kv)
    if static.backend == "reference":
        return reference.attention_reference(q, k, v, plan, bias, static.softmax_scale)
    tile_class = masks.classify_tiles(plan, static.tiles.tile_q, static.tiles.tile_kv)
    call = sharding.forward_call(static.backend, static.attrs())
    bias = None if bias is None else bias.astype(jnp.float32)
    head_dim = q.shape[-1]
    if static.backend in KERNEL_HEAD_DIMS:
        q, k, v = _pad_head_dim(static.backend, q, k, v)
    out, lse = call(q, k, v, _or_absent(bias, jnp.float32), _or_absent(q_ids, jnp.int32),
                    _or_absent(kv_ids, jnp.int32), _or_absent(dense, jnp.bool_), tile_class)
    return out[..., :head_dim], lse


def _backward(static: _Static, q, k, v, bias, q_ids, kv_ids, dense, out, lse, d_out, d_lse):
    plan = static.plan(q_ids, kv_ids, dense)
    if static.backend in ("xla", "volta") or (static.backend == "cuda"
                                               and q.shape[-1] > CUDA_BACKWARD_MAX_HEAD_DIM):
        # volta, and cuda at D > 128 (dK and dV of 16 keys x 256 dims would not fit a warp's
        # registers): the forward kernel's lse, then the blockwise JAX backward.
        tiles = static.tiles if static.backend == "xla" else XLA_TILES
        return blockwise.backward(q, k, v, bias, plan, static.softmax_scale, out, lse, d_out, d_lse,
                                  tiles.tile_q, tiles.tile_kv)
    if static.backend == "reference":
        def fn(q, k, v, bias):
            return reference.attention_reference(q, k, v, plan, bias, static.softmax_scale)
        _, vjp = jax.vjp(fn, q, k, v, bias)
        d_q, d_k, d_v, d_bias = vjp((d_out, d_lse))
        return d_q, d_k, d_v, d_bias
    tile_class = masks.classify_tiles(plan, static.tiles.tile_q, static.tiles.tile_kv)
    call = sharding.backward_call(static.backend, static.attrs())
    bias = None if bias is None else bias.astype(jnp.float32)
    head_dim = q.shape[-1]
    if static.backend in KERNEL_HEAD_DIMS:
        q, k, v, out, d_out = _pad_head_dim(static.backend, q, k, v, out, d_out)
    d_q, d_k, d_v, d_bias = call(q, k, v, out, lse, d_out, d_lse, _or_absent(bias, jnp.float32),
                                 _or_absent(q_ids, jnp.int32), _or_absent(kv_ids, jnp.int32),
                                 _or_absent(dense, jnp.bool_), tile_class)
    d_q, d_k, d_v = (x[..., :head_dim] for x in (d_q, d_k, d_v))
    return d_q, d_k, d_v, (None if bias is None else d_bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(static, q, k, v, bias, q_ids, kv_ids, dense):
    return _forward(static, q, k, v, bias, q_ids, kv_ids, dense)


def _attention_fwd(static, q, k, v, bias, q_ids, kv_ids, dense):
    out, lse = _forward(static, q, k, v, bias, q_ids, kv_ids, dense)
    return (out, lse), (q, k, v, bias, q_ids, kv_ids, dense, out, lse)


def _sum_to_shape(x, shape):
    """Reduces a full [B, H, Sq, Skv] gradient to a broadcast bias shape."""
    axes = tuple(i for i, (full, want) in enumerate(zip(x.shape, shape)) if want == 1 and full != 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def _attention_bwd(static, residuals, cotangents):
    q, k, v, bias, q_ids, kv_ids, dense, out, lse = residuals
    d_out, d_lse = cotangents
    d_q, d_k, d_v, d_bias = _backward(static, q, k, v, bias, q_ids, kv_ids, dense, out, lse,
                                      d_out.astype(q.dtype), d_lse.astype(jnp.float32))
    if bias is not None:
        d_bias = _sum_to_shape(d_bias, bias.shape).astype(bias.dtype)
    return d_q, d_k, d_v, d_bias, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention(q, k, v, *, mask: Optional[masks.Mask] = None, causal: bool = False, bias=None,
                    softmax_scale: Optional[float] = None, return_lse: bool = False, backend: str = "auto"):
    """Fused attention, layout as `jax.nn.dot_product_attention`.

    Args:
      q: [B, Sq, Hq, D]; k, v: [B, Skv, Hkv, D] with Hq % Hkv == 0 (MHA, GQA,
        MQA; q head h reads kv head h // (Hq // Hkv)). float32, bfloat16 or
        float16, D in [1, 256].
      mask: a `jax_fastattn.masks` mask (Causal, SlidingWindow, Segments,
        Dense or an `&` of them). `causal=True` adds `masks.Causal()`.
      bias: additive float [B|1, Hq|1, Sq, Skv].
      softmax_scale: Python float, default 1/sqrt(D).
      return_lse: also return the float32 log-sum-exp [B, Hq, Sq].
      backend: "auto", "cpu", "xla", "cuda", "volta" or "reference".

    Returns [B, Sq, Hq, D] in q's dtype (and lse). A query that sees no key
    gets zeros (lse = -inf). Differentiable in q, k, v and bias.
    """
    check_inputs(q, k, v, bias, softmax_scale)
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a Python bool, got {type(causal).__name__}")
    if not isinstance(return_lse, (bool, np.bool_)):
        raise TypeError(f"return_lse must be a Python bool, got {type(return_lse).__name__}")
    b, sq, hq, d = q.shape
    skv = k.shape[1]
    plan = masks.make_plan(mask, bool(causal), b, hq, sq, skv)
    concrete = resolve_backend(backend)
    if concrete in KERNEL_HEAD_DIMS:
        fits = q.dtype in KERNEL_DTYPES[concrete] and d <= KERNEL_HEAD_DIMS[concrete][-1]
        if backend == "auto" and not fits:
            concrete = "xla"  # documented: float32 or D > 128 on GPU take the pure-JAX backend
        elif q.dtype not in KERNEL_DTYPES[concrete]:
            names = " or ".join(jnp.dtype(t).name for t in KERNEL_DTYPES[concrete])
            raise TypeError(f"backend={concrete!r} takes {names} q, k, v, got {_dtype_name(q)} "
                            "(use backend='xla' for other dtypes)")
        elif d > KERNEL_HEAD_DIMS[concrete][-1]:
            raise ValueError(f"backend={concrete!r} supports head dim D <= {KERNEL_HEAD_DIMS[concrete][-1]}, "
                             f"got {d}")
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(d)
    tiles = {"cpu": CPU_TILES, "volta": VOLTA_TILES, "cuda": CUDA_TILES}.get(concrete, XLA_TILES)
    static = _Static(concrete, scale, sq, skv, int(plan.band_lo), int(plan.band_hi), tiles)
    out, lse = _attention(static, q, k, v, bias, plan.q_segment_ids, plan.kv_segment_ids, plan.dense)
    return (out, lse) if return_lse else out
