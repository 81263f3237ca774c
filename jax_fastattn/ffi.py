"""Loads the compiled handlers, registers them with XLA and wraps them as
`jax.ffi.ffi_call`s.

Every wrapper takes the same arrays in the same order; an absent optional
input (bias, segment ids, dense mask, d_lse) is an empty rank-1 array, which
the C++ side reads as "absent". `vmap` is handled here by `custom_vmap`: the
vmapped axis is folded into the batch axis, so the kernels only ever see
rank-4 [B, S, H, D] arrays (arrays whose batch dim is 1 for broadcasting stay
unbroadcast when not vmapped).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

try:
    from . import _xla_ffi
except ImportError as error:  # pragma: no cover - only without a build
    _xla_ffi = None
    _IMPORT_ERROR = error
else:
    _IMPORT_ERROR = None

_REGISTERED = False


def library_available() -> bool:
    return _xla_ffi is not None


def register() -> None:
    """Registers every handler of the library with XLA (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    if _xla_ffi is None:
        raise RuntimeError(
            "jax_fastattn's compiled library is missing (build it with `pip install -e .`): "
            f"{_IMPORT_ERROR}")
    for name, capsule in _xla_ffi.cpu_targets().items():
        jax.ffi.register_ffi_target(name, capsule, platform="cpu")
    _REGISTERED = True


def absent(dtype=jnp.float32):
    """Placeholder for a missing optional input."""
    return jnp.zeros((0,), dtype)


def is_absent(x) -> bool:
    return x.ndim == 1 and x.shape[0] == 0


@dataclasses.dataclass(frozen=True)
class CallAttrs:
    """Static attributes of one custom call (hashable)."""

    softmax_scale: float
    band_lo: int
    band_hi: int
    tile_q: int
    tile_kv: int

    def as_ffi(self):
        return dict(softmax_scale=np.float32(self.softmax_scale), band_lo=np.int64(self.band_lo),
                    band_hi=np.int64(self.band_hi), tile_q=np.int64(self.tile_q),
                    tile_kv=np.int64(self.tile_kv))


# Which inputs may keep a batch dim of 1 (broadcast) instead of B.
_FORWARD_BROADCASTABLE = (False, False, False, True, False, False, True, True)
_BACKWARD_BROADCASTABLE = (False,) * 7 + (True, False, False, True, True)


def _fold_vmap_axis(args, batched, broadcastable, axis_size):
    """Moves a vmapped leading axis into the batch axis of every input."""
    full_batch = next(x.shape[1] if b else x.shape[0]
                      for x, b, bc in zip(args, batched, broadcastable) if not bc)
    folded = []
    for x, is_batched, can_broadcast in zip(args, batched, broadcastable):
        if is_absent(x) and not is_batched:
            folded.append(x)
            continue
        if is_batched:
            if x.shape[1] != full_batch:
                x = jnp.broadcast_to(x, (axis_size, full_batch) + x.shape[2:])
        else:
            if can_broadcast and x.shape[0] == 1:
                folded.append(x)
                continue
            x = jnp.broadcast_to(x[None], (axis_size,) + x.shape)
        folded.append(x.reshape((axis_size * x.shape[1],) + x.shape[2:]))
    return folded


def _unfold(x, axis_size):
    return x.reshape((axis_size, x.shape[0] // axis_size) + x.shape[1:])


def _batched_call(call, broadcastable):
    """Wraps `call(*arrays) -> tuple` with a vmap rule that folds the vmapped
    axis into the batch axis."""
    wrapped = jax.custom_batching.custom_vmap(call)

    @wrapped.def_vmap
    def rule(axis_size, in_batched, *args):
        results = wrapped(*_fold_vmap_axis(args, in_batched, broadcastable, axis_size))
        outs = tuple(r if is_absent(r) else _unfold(r, axis_size) for r in results)
        return outs, tuple(not is_absent(r) for r in results)

    return wrapped


@functools.lru_cache(maxsize=None)
def forward_call(platform: str, attrs: CallAttrs):
    """fn(q, k, v, bias, q_ids, kv_ids, dense, tile_class) -> (out, lse)."""
    register()

    def call(q, k, v, bias, q_ids, kv_ids, dense, tile_class):
        b, sq, hq, _ = q.shape
        result_types = (jax.ShapeDtypeStruct(q.shape, q.dtype),
                        jax.ShapeDtypeStruct((b, hq, sq), jnp.float32))
        fn = jax.ffi.ffi_call(f"fastattn_forward_{platform}", result_types, vmap_method="broadcast_all")
        return tuple(fn(q, k, v, bias, q_ids, kv_ids, dense, tile_class, **attrs.as_ffi()))

    return _batched_call(call, _FORWARD_BROADCASTABLE)


@functools.lru_cache(maxsize=None)
def backward_call(platform: str, attrs: CallAttrs):
    """fn(q, k, v, out, lse, d_out, d_lse, bias, q_ids, kv_ids, dense,
    tile_class) -> (dq, dk, dv, dbias)."""
    register()

    def call(q, k, v, out, lse, d_out, d_lse, bias, q_ids, kv_ids, dense, tile_class):
        b, sq, hq, _ = q.shape
        d_bias_type = (jax.ShapeDtypeStruct((0,), jnp.float32) if is_absent(bias)
                       else jax.ShapeDtypeStruct((b, hq, sq, k.shape[1]), jnp.float32))
        result_types = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                        jax.ShapeDtypeStruct(v.shape, v.dtype), d_bias_type)
        fn = jax.ffi.ffi_call(f"fastattn_backward_{platform}", result_types, vmap_method="broadcast_all")
        return tuple(fn(q, k, v, out, lse, d_out, d_lse, bias, q_ids, kv_ids, dense, tile_class,
                        **attrs.as_ffi()))

    return _batched_call(call, _BACKWARD_BROADCASTABLE)
