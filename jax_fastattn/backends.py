"""One record per backend: what it supports and how it runs.

Everything that depends on the backend reads this table: the argument
checks (dtypes, head dims), backend="auto", the tile sizes of the mask plan,
and which forward and backward run. Adding a backend is adding a record.

A record's forward is `fn(call, q, k, v, bias, q_ids, kv_ids, dense) ->
(out, lse)` and its backward `fn(call, q, k, v, bias, q_ids, kv_ids, dense,
out, lse, d_out, d_lse) -> (d_q, d_k, d_v, d_bias)`, where `call` is the
hashable `Call` of attention.py (scale, band, tiles, kernel config, plan).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp

from . import blockwise, ffi, masks, reference, sharding
from .config import CPU_TILES, CUDA_TILES, VOLTA_TILES, XLA_TILES, TileConfig
from .errors import ArgumentError

MAX_HEAD_DIM = 256
ALL_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Backend:
    """What one backend supports, and its forward and backward.

    kernel_head_dims: the head dims the kernels are built for (smaller ones
      are zero-padded up to the next); None = any head dim up to
      max_head_dim.
    fused_backward_max_head_dim: above it, the backward is the blockwise
      JAX backward on the forward kernel's lse (0: always blockwise).
    tiles_fixed: the kernel's tiles are compiled in; a config may not
      change them.
    platform: "cpu", "cuda" or None (runs wherever JAX runs).
    decode_target: the custom call of decode_attention, or None.
    decode_dtypes: the dtypes its decode kernel takes (the split-KV decode
      kernels also read float32 caches).
    """

    name: str
    dtypes: Tuple[str, ...]
    max_head_dim: int
    kernel_head_dims: Optional[Tuple[int, ...]]
    fused_backward_max_head_dim: int
    tiles: TileConfig
    tiles_fixed: bool
    platform: Optional[str]
    forward_target: Optional[str]
    decode_target: Optional[str]
    forward: Callable
    backward: Callable
    decode_dtypes: Tuple[str, ...] = ALL_DTYPES

    def padded_head_dim(self, head_dim: int) -> int:
        if self.kernel_head_dims is None:
            return head_dim
        return next(d for d in self.kernel_head_dims if d >= head_dim)

    def supports(self, dtype, head_dim: int, op: str = "attention") -> bool:
        dtypes = self.decode_dtypes if op == "decode" else self.dtypes
        return (jnp.dtype(dtype).name in dtypes and head_dim <= self.max_head_dim
                and not (op == "decode" and decode_row_problem(self, dtype, head_dim)))


def decode_row_problem(backend: "Backend", dtype, head_dim: int) -> Optional[str]:
    """Why `backend`'s decode kernel cannot take rows of this head dim, or
    None. The CUDA decode kernel reads K/V rows as whole 16-byte vectors."""
    itemsize = jnp.dtype(dtype).itemsize
    if backend.name == "cuda" and head_dim * itemsize % 16 != 0:
        return (f"backend='cuda' decode reads rows of whole 16-byte vectors: q.shape[-1] must be a multiple of "
                f"{16 // itemsize} for {jnp.dtype(dtype).name}, got {head_dim}; use backend='xla'")
    return None


# ----------------------------------------------------------------------------
# Forwards and backwards


def _or_absent(x, dtype):
    return ffi.absent(dtype) if x is None else x


def _pad_head_dim(padded: int, *arrays):
    """Zero-pads the head dim (changes no score; the padded columns of out and
    of every gradient are zero)."""
    return tuple(jnp.pad(x, ((0, 0),) * 3 + ((0, padded - x.shape[-1]),)) for x in arrays)


def _kernel_forward(call, q, k, v, bias, q_ids, kv_ids, dense):
    backend = BACKENDS[call.backend]
    plan = call.plan(q_ids, kv_ids, dense)
    tile_class = masks.classify_tiles(plan, call.tiles.tile_q, call.tiles.tile_kv)
    fn = sharding.forward_call(call.backend, call.attrs())
    bias = None if bias is None else bias.astype(jnp.float32)
    head_dim = q.shape[-1]
    q, k, v = _pad_head_dim(backend.padded_head_dim(head_dim), q, k, v)
    out, lse = fn(q, k, v, _or_absent(bias, jnp.float32), _or_absent(q_ids, jnp.int32),
                  _or_absent(kv_ids, jnp.int32), _or_absent(dense, jnp.bool_), tile_class)
    return out[..., :head_dim], lse


def _kernel_backward(call, q, k, v, bias, q_ids, kv_ids, dense, out, lse, d_out, d_lse):
    backend = BACKENDS[call.backend]
    if q.shape[-1] > backend.fused_backward_max_head_dim:
        return _blockwise_backward(call, q, k, v, bias, q_ids, kv_ids, dense, out, lse, d_out, d_lse)
    plan = call.plan(q_ids, kv_ids, dense)
    tile_class = masks.classify_tiles(plan, call.tiles.tile_q, call.tiles.tile_kv)
    fn = sharding.backward_call(call.backend, call.attrs())
    bias = None if bias is None else bias.astype(jnp.float32)
    head_dim = q.shape[-1]
    q, k, v, out, d_out = _pad_head_dim(backend.padded_head_dim(head_dim), q, k, v, out, d_out)
    d_q, d_k, d_v, d_bias = fn(q, k, v, out, lse, d_out, d_lse, _or_absent(bias, jnp.float32),
                               _or_absent(q_ids, jnp.int32), _or_absent(kv_ids, jnp.int32),
                               _or_absent(dense, jnp.bool_), tile_class)
    d_q, d_k, d_v = (x[..., :head_dim] for x in (d_q, d_k, d_v))
    return d_q, d_k, d_v, (None if bias is None else d_bias)


def _blockwise_forward(call, q, k, v, bias, q_ids, kv_ids, dense):
    plan = call.plan(q_ids, kv_ids, dense)
    return blockwise.forward(q, k, v, bias, plan, call.softmax_scale, call.tiles.tile_q, call.tiles.tile_kv)


def _blockwise_backward(call, q, k, v, bias, q_ids, kv_ids, dense, out, lse, d_out, d_lse):
    """The blockwise JAX backward, at the xla backend's tiles unless this is
    the xla backend (a kernel's fixed tiles are too small for XLA loops)."""
    plan = call.plan(q_ids, kv_ids, dense)
    tiles = call.tiles if call.backend == "xla" else XLA_TILES
    return blockwise.backward(q, k, v, bias, plan, call.softmax_scale, out, lse, d_out, d_lse,
                              tiles.tile_q, tiles.tile_kv)


def _reference_forward(call, q, k, v, bias, q_ids, kv_ids, dense):
    return reference.attention_reference(q, k, v, call.plan(q_ids, kv_ids, dense), bias, call.softmax_scale)


def _reference_backward(call, q, k, v, bias, q_ids, kv_ids, dense, out, lse, d_out, d_lse):
    plan = call.plan(q_ids, kv_ids, dense)
    _, vjp = jax.vjp(lambda q, k, v, b: reference.attention_reference(q, k, v, plan, b, call.softmax_scale),
                     q, k, v, bias)
    return vjp((d_out, d_lse))


# ----------------------------------------------------------------------------
# The table

BACKENDS = {
    # C++ custom calls: FlashAttention-2 forward + fused backward, two-level
    # tiled, multithreaded; any head dim and tile size.
    "cpu": Backend("cpu", ALL_DTYPES, MAX_HEAD_DIM, None, MAX_HEAD_DIM, CPU_TILES, False, "cpu",
                   "fastattn_forward_cpu", "fastattn_decode_cpu", _kernel_forward, _kernel_backward),
    # sm80+ mma.sync and sm90a wgmma kernels; head dims padded up to 64/128/256;
    # the fused backward takes D <= 128 (dK and dV of 16 keys x 256 dims do not
    # fit a warp's registers).
    "cuda": Backend("cuda", ("bfloat16", "float16"), MAX_HEAD_DIM, (64, 128, 256), 128, CUDA_TILES, True,
                    "cuda", "fastattn_forward_cuda", "fastattn_decode_cuda", _kernel_forward, _kernel_backward),
    # FastAttention's Volta forward (mma.m8n8k4); backward blockwise JAX.
    "volta": Backend("volta", ("float16",), 128, (64, 128), 0, VOLTA_TILES, True, "cuda",
                     "fastattn_forward_volta", None, _kernel_forward, _blockwise_backward),
    # Pure-JAX online softmax, O(S) memory, tile skipping via lax.switch.
    "xla": Backend("xla", ALL_DTYPES, MAX_HEAD_DIM, None, MAX_HEAD_DIM, XLA_TILES, False, None,
                   None, None, _blockwise_forward, _blockwise_backward),
    # Plain JAX in float32, materialises the logits.
    "reference": Backend("reference", ALL_DTYPES, MAX_HEAD_DIM, None, MAX_HEAD_DIM, XLA_TILES, False, None,
                         None, None, _reference_forward, _reference_backward),
}
BACKEND_NAMES = ("auto",) + tuple(BACKENDS)


# ----------------------------------------------------------------------------
# Choosing a backend


def _is_volta(device) -> bool:
    return getattr(device, "compute_capability", None) == "7.0"


def _has_kernel(backend: Backend, op: str) -> bool:
    target = backend.forward_target if op == "attention" else backend.decode_target
    if target is None:
        return False
    if backend.platform == "cpu":
        return ffi.library_available()
    return target in ffi.cuda_targets()


def _auto(op: str) -> str:
    """The backend "auto" means on the default device, before the inputs are
    looked at: the CPU kernel on CPU, the Volta kernel on sm70, the CUDA
    kernels on other GPUs, else xla."""
    device = jax.devices()[0]
    if device.platform == "cpu" and _has_kernel(BACKENDS["cpu"], op):
        return "cpu"
    if device.platform == "gpu":
        if _is_volta(device):
            # The CUDA kernels are built for sm80+: on a V100 only the Volta
            # forward exists; decode runs on xla.
            return "volta" if _has_kernel(BACKENDS["volta"], op) else "xla"
        if _has_kernel(BACKENDS["cuda"], op):
            return "cuda"
    return "xla"


def _check_available(name: str, op: str) -> None:
    backend = BACKENDS[name]
    if backend.platform == "cuda" and not ffi.gpu_available():
        raise ArgumentError(f"backend={name!r} needs a CUDA GPU, but JAX sees none "
                            f"(devices: {[d.platform for d in jax.devices()]}); use 'cpu' or 'xla'")
    if backend.platform == "cpu" and not ffi.library_available():
        raise ArgumentError(f"backend={name!r} needs the compiled library; build it with `pip install -e .`")
    if op == "decode" and backend.platform is not None and backend.decode_target is None:
        raise ArgumentError(f"backend={name!r} has no decode kernel; decode_attention runs on 'cuda', 'cpu', 'xla' "
                            "or 'reference'")
    if backend.platform is not None and not _has_kernel(backend, op):
        raise ArgumentError(f"backend={name!r} has no {op} kernel in this build (CUDA kernels need nvcc at "
                            "build time, the Volta kernel also NVRTC 12); use 'xla'")


def resolve(backend, op: str, dtype, head_dim: int, arg: str = "q") -> Backend:
    """The Backend record for a call. "auto" picks by device (`_auto`); when
    that kernel does not take the dtype or head dim, "auto" takes "xla"
    (documented). A named backend that cannot run the call raises
    ArgumentError naming `backend`, the dtype or `arg`'s last axis."""
    if not isinstance(backend, str) or backend not in BACKEND_NAMES:
        raise ArgumentError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    name = _auto(op) if backend == "auto" else backend
    _check_available(name, op)
    record = BACKENDS[name]
    if backend == "auto" and not record.supports(dtype, head_dim, op):
        return BACKENDS["xla"]
    dtype_name = jnp.dtype(dtype).name
    dtypes = record.decode_dtypes if op == "decode" else record.dtypes
    if dtype_name not in dtypes:
        raise ArgumentError(f"backend={name!r} takes {' or '.join(dtypes)} inputs, got {arg} of dtype "
                            f"{dtype_name}; backends that take {dtype_name}: "
                            f"{[n for n, b in BACKENDS.items() if b.supports(dtype, 1, op)]}")
    if head_dim > record.max_head_dim:
        raise ArgumentError(f"backend={name!r} supports head dims up to {record.max_head_dim}, got {arg}.shape[-1] "
                            f"= {head_dim}")
    problem = decode_row_problem(record, dtype, head_dim) if op == "decode" else None
    if problem:
        raise ArgumentError(problem)
    return record
