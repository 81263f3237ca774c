"""flash_attention(): argument checks, backend choice (backends.py) and the
custom_vjp that ties a backend's forward and backward together."""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import backends, ffi, masks
from .config import DEFAULT, WGMMA_BACKWARD_KERNELS, KernelConfig, TileConfig
from .errors import ArgumentError

_FLOAT_DTYPES = [jnp.dtype(d) for d in backends.ALL_DTYPES]


def check_inputs(q, k, v, bias, softmax_scale, names=("q", "k", "v")) -> None:
    """Raises ArgumentError naming the bad argument (as the caller wrote it:
    `names` are the names of q, k and v in the public function)."""
    q_name, k_name, v_name = names
    for name, x in zip(names, (q, k, v)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise ArgumentError(f"{name} must be an array, got {type(x).__name__}")
        if x.ndim != 4:
            raise ArgumentError(f"{name} must have rank 4 [B, S, H, D], got shape {tuple(x.shape)}")
        if jnp.result_type(x) not in _FLOAT_DTYPES:
            raise ArgumentError(f"{name} must be float32, bfloat16 or float16, got {jnp.result_type(x)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ArgumentError(f"{q_name}, {k_name} and {v_name} must share one dtype, got {q.dtype}, {k.dtype}, "
                            f"{v.dtype}")
    if k.shape != v.shape:
        raise ArgumentError(f"{k_name} and {v_name} must have the same shape [B, Skv, Hkv, D], got {k.shape} and "
                            f"{v.shape}")
    b, sq, hq, d = q.shape
    if k.shape[0] != b:
        raise ArgumentError(f"{k_name}/{v_name} batch ({k.shape[0]}) must equal {q_name} batch ({b})")
    if k.shape[3] != d:
        raise ArgumentError(f"{k_name}/{v_name} head dim ({k.shape[3]}) must equal {q_name} head dim ({d})")
    if not 1 <= d <= backends.MAX_HEAD_DIM:
        raise ArgumentError(f"head dim D ({q_name}.shape[-1]) must be in [1, {backends.MAX_HEAD_DIM}], got {d}")
    if sq < 1 or k.shape[1] < 1 or b < 1:
        raise ArgumentError(f"batch and sequence lengths must be >= 1, got {q_name} {q.shape}, {k_name} {k.shape}")
    hkv = k.shape[2]
    if hq < 1 or hkv < 1 or hq % hkv != 0:
        raise ArgumentError(f"{q_name} heads ({hq}) must be a multiple of {k_name}/{v_name} heads ({hkv}) "
                            "(MHA, GQA or MQA)")
    if bias is not None:
        shape = tuple(np.shape(bias))
        ok = (len(shape) == 4 and shape[0] in (1, b) and shape[1] in (1, hq)
              and shape[2] == sq and shape[3] == k.shape[1])
        if not ok:
            raise ArgumentError(
                f"bias must have shape [B|1, H|1, Sq, Skv] with B={b}, H={hq}, Sq={sq}, Skv={k.shape[1]}; "
                f"got {shape}")
        if not jnp.issubdtype(jnp.result_type(bias), jnp.floating):
            raise ArgumentError(f"bias must be a float array, got {jnp.result_type(bias)}")
    check_softmax_scale(softmax_scale)


def check_softmax_scale(softmax_scale) -> None:
    if softmax_scale is None:
        return
    if isinstance(softmax_scale, (jax.core.Tracer, bool)) or not isinstance(softmax_scale, (int, float, np.floating)):
        raise ArgumentError(f"softmax_scale must be a Python float, got {type(softmax_scale).__name__}")
    if not math.isfinite(float(softmax_scale)):
        raise ArgumentError(f"softmax_scale must be finite, got {softmax_scale}")


def _check_wgmma_request(config: KernelConfig, backend: backends.Backend, head_dim: int, has_bias: bool) -> None:
    """An explicit "wgmma" request the wgmma kernels cannot take fails here,
    at trace time (whether the GPU is an sm90 one, only the handler knows:
    it then fails with an error naming the option)."""
    padded = backend.padded_head_dim(head_dim)
    for name in ("cuda_forward", "cuda_backward"):
        choice = getattr(config, name)
        if choice in WGMMA_BACKWARD_KERNELS and padded not in (64, 128):
            raise ArgumentError(f"config.{name}={choice!r}: the wgmma kernels take head dims up to 64 or 128 "
                                f"(padded), got q.shape[-1] = {head_dim}")
    if config.cuda_backward in WGMMA_BACKWARD_KERNELS and has_bias:
        raise ArgumentError(f"config.cuda_backward={config.cuda_backward!r}: the wgmma backward has no bias "
                            "gradient; use 'auto' or 'mma_sync' with a bias")


def check_config(config, backend: backends.Backend, head_dim: int, has_bias: bool) -> KernelConfig:
    """The KernelConfig of a call (None = the default), checked against the
    backend that runs it: options of another backend's kernels, or tiles a
    kernel cannot take, are errors, not ignored."""
    config = config_or_default(config)
    if config.tiles is not None and backend.tiles_fixed and config.tiles != backend.tiles:
        raise ArgumentError(f"config.tiles: backend={backend.name!r} has fixed tiles {backend.tiles}, got "
                            f"{config.tiles}")
    if backend.name != "cuda" and (config.cuda_forward, config.cuda_backward) != ("auto", "auto"):
        raise ArgumentError(f"config.cuda_forward/cuda_backward choose CUDA kernels, but the call runs on "
                            f"backend={backend.name!r}")
    if backend.name == "cuda":
        _check_wgmma_request(config, backend, head_dim, has_bias)
    if backend.name != "volta" and config.volta_layout != DEFAULT.volta_layout:
        raise ArgumentError(f"config.volta_layout chooses the Volta kernel's layout, but the call runs on "
                            f"backend={backend.name!r}")
    if config.cuda_decode != DEFAULT.cuda_decode:
        raise ArgumentError("config.cuda_decode chooses the decode kernel; flash_attention does not take it "
                            "(decode_attention does)")
    check_cpu_isa(config, backend.name)
    return config


def config_or_default(config) -> KernelConfig:
    """`config` if it is a KernelConfig, DEFAULT for None; else an error."""
    if config is None:
        return DEFAULT
    if not isinstance(config, KernelConfig):
        raise ArgumentError(f"config must be a jax_fastattn.config.KernelConfig or None, got {type(config).__name__}")
    return config


def check_cpu_isa(config: KernelConfig, backend: str) -> None:
    """A cpu_isa choice is an error on any backend but "cpu"."""
    if backend != "cpu" and config.cpu_isa != DEFAULT.cpu_isa:
        raise ArgumentError(f"config.cpu_isa chooses the CPU kernels' instruction-set level, but the call runs "
                            f"on backend={backend!r}")


@dataclasses.dataclass(frozen=True)
class Call:
    """Everything static about one call (hashable: a custom_vjp nondiff arg)."""

    backend: str
    softmax_scale: float
    q_len: int
    kv_len: int
    band_lo: int
    band_hi: int
    tiles: TileConfig
    kernel: KernelConfig = DEFAULT

    def plan(self, q_ids, kv_ids, dense) -> masks.MaskPlan:
        return masks.MaskPlan(self.q_len, self.kv_len, self.band_lo, self.band_hi, q_ids, kv_ids, dense)

    def attrs(self) -> ffi.CallAttrs:
        return ffi.CallAttrs(self.softmax_scale, self.band_lo, self.band_hi, self.tiles.tile_q, self.tiles.tile_kv,
                             kernel=self.kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(call, q, k, v, bias, q_ids, kv_ids, dense):
    return backends.BACKENDS[call.backend].forward(call, q, k, v, bias, q_ids, kv_ids, dense)


def _attention_fwd(call, q, k, v, bias, q_ids, kv_ids, dense):
    out, lse = backends.BACKENDS[call.backend].forward(call, q, k, v, bias, q_ids, kv_ids, dense)
    return (out, lse), (q, k, v, bias, q_ids, kv_ids, dense, out, lse)


def _sum_to_shape(x, shape):
    """Reduces a full [B, H, Sq, Skv] gradient to a broadcast bias shape."""
    axes = tuple(i for i, (full, want) in enumerate(zip(x.shape, shape)) if want == 1 and full != 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def _attention_bwd(call, residuals, cotangents):
    q, k, v, bias, q_ids, kv_ids, dense, out, lse = residuals
    d_out, d_lse = cotangents
    d_q, d_k, d_v, d_bias = backends.BACKENDS[call.backend].backward(
        call, q, k, v, bias, q_ids, kv_ids, dense, out, lse, d_out.astype(q.dtype), d_lse.astype(jnp.float32))
    if bias is not None:
        d_bias = _sum_to_shape(d_bias, bias.shape).astype(bias.dtype)
    return d_q, d_k, d_v, d_bias, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _plan_call(q, k, mask, causal, softmax_scale, backend, config, has_bias):
    """(Call, mask plan, Backend record) of a call whose q, k, v passed
    check_inputs: the mask lowered for its shapes, the backend resolved and
    the config checked against it."""
    if not isinstance(causal, (bool, np.bool_)):
        raise ArgumentError(f"causal must be a Python bool, got {type(causal).__name__}")
    b, sq, hq, d = q.shape
    skv = k.shape[1]
    plan = masks.make_plan(mask, bool(causal), b, hq, sq, skv)
    record = backends.resolve(backend, "attention", q.dtype, d)
    kernel = check_config(config, record, d, has_bias)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(d)
    call = Call(record.name, scale, sq, skv, int(plan.band_lo), int(plan.band_hi), kernel.tiles or record.tiles,
                kernel)
    return call, plan, record


def flash_attention(q, k, v, *, mask: Optional[masks.Mask] = None, causal: bool = False, bias=None,
                    softmax_scale: Optional[float] = None, return_lse: bool = False, backend: str = "auto",
                    config: Optional[KernelConfig] = None):
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
      backend: "auto", "cpu", "cuda", "volta", "xla" or "reference"
        (backends.py says what each supports). "auto" runs the kernel of the
        default device, or "xla" where that kernel does not take the dtype or
        head dim (float32 on GPUs); a named backend that cannot run the call
        raises an error.
      config: a `jax_fastattn.config.KernelConfig` (kernel variant, tile
        sizes), or None for the backend's default.

    Returns [B, Sq, Hq, D] in q's dtype (and lse). A query that sees no key
    gets zeros (lse = -inf). Differentiable in q, k, v and bias. Bad or
    unsupported arguments raise `jax_fastattn.errors.ArgumentError` (a
    ValueError, also a TypeError) naming the argument.
    """
    check_inputs(q, k, v, bias, softmax_scale)
    if not isinstance(return_lse, (bool, np.bool_)):
        raise ArgumentError(f"return_lse must be a Python bool, got {type(return_lse).__name__}")
    call, plan, _ = _plan_call(q, k, mask, causal, softmax_scale, backend, config, bias is not None)
    out, lse = _attention(call, q, k, v, bias, plan.q_segment_ids, plan.kv_segment_ids, plan.dense)
    return (out, lse) if return_lse else out


def flash_attention_backward(q, k, v, out, lse, d_out, d_lse=None, *, mask: Optional[masks.Mask] = None,
                             causal: bool = False, softmax_scale: Optional[float] = None, backend: str = "auto",
                             config: Optional[KernelConfig] = None):
    """(d_q, d_k, d_v) of attention over these keys, given `out` and `lse`.

    The fused backward needs only the softmax's normaliser (lse) and
    rowsum(d_out * out); when they come from a larger softmax, of which
    these keys are one part (ring attention: the merged out and lse of all
    steps), this gives that part's exact gradients without recomputing its
    forward. `out` [B, Sq, Hq, D] and `d_out` like q; `lse` and `d_lse`
    float32 [B, Hq, Sq] (d_lse None = 0). Same masks, scale, backends and
    config as flash_attention (no bias).
    """
    check_inputs(q, k, v, None, softmax_scale)
    b, sq, hq, d = q.shape
    lse_shape = (b, hq, sq)
    for name, x, shape in (("out", out, q.shape), ("d_out", d_out, q.shape), ("lse", lse, lse_shape),
                           ("d_lse", d_lse, lse_shape)):
        if x is not None and tuple(np.shape(x)) != tuple(shape):
            raise ArgumentError(f"{name} must have shape {tuple(shape)}, got {tuple(np.shape(x))}")
    call, plan, record = _plan_call(q, k, mask, causal, softmax_scale, backend, config, False)
    d_lse = jnp.zeros(lse_shape, jnp.float32) if d_lse is None else d_lse.astype(jnp.float32)
    # The reference backward differentiates its own forward (this part's
    # softmax alone); the blockwise one, like the kernels', uses the given lse.
    backward = backends.BACKENDS["xla"].backward if record.name == "reference" else record.backward
    d_q, d_k, d_v, _ = backward(call, q, k, v, None, plan.q_segment_ids, plan.kv_segment_ids, plan.dense,
                                       out.astype(q.dtype), lse.astype(jnp.float32), d_out.astype(q.dtype), d_lse)
    return d_q, d_k, d_v
