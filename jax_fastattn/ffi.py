"""Loads the compiled handlers, registers them with XLA and wraps them as
`jax.ffi.ffi_call`s.

Every wrapper takes the same arrays in the same order; an absent optional
input (bias, segment ids, dense mask, d_lse) is an empty rank-1 array, which
the C++ side reads as "absent". These are the raw calls on one device's
arrays; sharding.py wraps them for vmap and for partitioning.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from .config import DEFAULT, ONE_PASS_BACKWARD_KERNELS, KernelConfig

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
    if gpu_available():
        for name, capsule in _xla_ffi.cuda_targets().items():
            jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
    _REGISTERED = True


def gpu_available() -> bool:
    try:
        return len(jax.devices("gpu")) > 0
    except RuntimeError:
        return False


@functools.lru_cache(maxsize=None)
def cuda_targets() -> frozenset:
    """Names of the CUDA custom calls this build has (empty without nvcc)."""
    return frozenset(_xla_ffi.cuda_targets()) if _xla_ffi is not None else frozenset()


def absent(dtype=jnp.float32):
    """Placeholder for a missing optional input."""
    return jnp.zeros((0,), dtype)


def is_absent(x) -> bool:
    return x.ndim == 1 and x.shape[0] == 0


# Integer codes of the kernel choices, as the C++ enums declare them
# (xla_ffi/cuda/kernel_choice.h KernelChoice and VoltaLayout,
# xla_ffi/cpu/dispatch.h CpuIsa).
KERNEL_CODES = {
    "cuda_forward": {"auto": 0, "wgmma": 1, "mma_sync": 2},
    "cuda_backward": {"auto": 0, "wgmma": 1, "mma_sync": 2, "wgmma_ordered": 3, "wgmma_atomic": 4},
    "cuda_decode": {"auto": 0, "simt": 1, "mma_sync": 2},
    "volta_layout": {"swizzled": 0, "naive": 1},
    "cpu_isa": {"auto": 0, "avx2": 1, "avx512": 2, "avx512_bf16": 3, "amx": 4},
}

# The KernelConfig fields each custom call takes, as int32 attributes of the
# same names. XLA FFI rejects attributes a handler does not declare, so every
# call gets exactly its own.
KERNEL_ATTRS = {
    "fastattn_forward_cpu": ("cpu_isa",),
    "fastattn_backward_cpu": ("cpu_isa",),
    "fastattn_forward_cuda": ("cuda_forward",),
    "fastattn_backward_cuda": ("cuda_backward",),
    "fastattn_forward_volta": ("volta_layout",),
}


@dataclasses.dataclass(frozen=True)
class CallAttrs:
    """Static attributes of one custom call (hashable). `kernel` holds the
    typed kernel choices (config.KernelConfig), which reach the handlers
    that take them as attributes, never through the environment."""

    softmax_scale: float
    band_lo: int
    band_hi: int
    tile_q: int
    tile_kv: int
    kernel: KernelConfig = DEFAULT

    def __post_init__(self):
        if not isinstance(self.kernel, KernelConfig):
            raise ValueError(f"config must be a jax_fastattn.config.KernelConfig, got {type(self.kernel).__name__}")

    def as_ffi(self, target: str = "") -> dict:
        """The attributes of the custom call `target` (e.g.
        "fastattn_forward_cuda"): the scalars every attention call takes,
        and the kernel choices of KERNEL_ATTRS[target] as int32 codes."""
        attrs = dict(softmax_scale=np.float32(self.softmax_scale), band_lo=np.int64(self.band_lo),
                     band_hi=np.int64(self.band_hi), tile_q=np.int64(self.tile_q),
                     tile_kv=np.int64(self.tile_kv))
        for name in KERNEL_ATTRS.get(target, ()):
            attrs[name] = np.int32(KERNEL_CODES[name][getattr(self.kernel, name)])
        return attrs


def forward_ffi(platform: str, attrs: CallAttrs):
    """fn(q, k, v, bias, q_ids, kv_ids, dense, tile_class) -> (out, lse), and
    on CUDA a third result: an int32 [B, Hq, 1] workspace whose first
    element the kernel counts its work items on (an output, so that XLA
    keeps it alive until the kernel ran; laid out per batch and head so that
    it shards as they do, every shard's call with its own)."""
    register()

    def call(q, k, v, bias, q_ids, kv_ids, dense, tile_class):
        b, sq, hq, _ = q.shape
        result_types = (jax.ShapeDtypeStruct(q.shape, q.dtype),
                        jax.ShapeDtypeStruct((b, hq, sq), jnp.float32))
        if platform == "cuda":
            result_types += (jax.ShapeDtypeStruct((b, hq, 1), jnp.int32),)
        target = f"fastattn_forward_{platform}"
        fn = jax.ffi.ffi_call(target, result_types, vmap_method="broadcast_all")
        return tuple(fn(q, k, v, bias, q_ids, kv_ids, dense, tile_class, **attrs.as_ffi(target)))

    return call


@functools.lru_cache(maxsize=None)
def cuda_devices_run_wgmma() -> bool:
    """True if every CUDA device is compute capability 9.0 (H100/H200), the
    devices the wgmma kernels run on (whether this build has their sm_90a
    code, only the handlers know)."""
    try:
        devices = jax.devices("gpu")
    except RuntimeError:
        return False
    return bool(devices) and all(getattr(d, "compute_capability", "9.0") == "9.0" for d in devices)


def fused_dq_workspace(kernel: KernelConfig, head_dim: int, has_bias: bool) -> bool:
    """Whether a CUDA backward call gets the one-pass wgmma backward's dQ
    workspace: where KernelConfig.cuda_backward asks for it
    ("wgmma_ordered", "wgmma_atomic", or "auto", which then takes the
    ordered one), for head dims 64/128 without a bias gradient, on sm90
    devices."""
    return (kernel.cuda_backward in ("auto",) + ONE_PASS_BACKWARD_KERNELS and head_dim in (64, 128)
            and not has_bias and cuda_devices_run_wgmma())


def backward_ffi(platform: str, attrs: CallAttrs):
    """fn(q, k, v, out, lse, d_out, d_lse, bias, q_ids, kv_ids, dense,
    tile_class) -> (dq, dk, dv, dbias) on the CPU, (dq, dk, dv, dbias,
    delta, dq_accum, dq_turns) on CUDA: workspaces of the kernels (outputs,
    so that XLA keeps them alive until they ran): delta [B, Hq, Sq] float32;
    dq_accum [B, Hq, q tiles * 64 * D] float32 and dq_turns [B, Hq, q tiles]
    int32, the fused wgmma backward's dQ sums and their order flags (width 0
    where fused_dq_workspace says that it cannot run)."""
    register()

    def call(q, k, v, out, lse, d_out, d_lse, bias, q_ids, kv_ids, dense, tile_class):
        b, sq, hq, d = q.shape
        d_bias_type = (jax.ShapeDtypeStruct((0,), jnp.float32) if is_absent(bias)
                       else jax.ShapeDtypeStruct((b, hq, sq, k.shape[1]), jnp.float32))
        result_types = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                        jax.ShapeDtypeStruct(v.shape, v.dtype), d_bias_type)
        if platform == "cuda":
            q_tiles = -(-sq // 64) if fused_dq_workspace(attrs.kernel, d, not is_absent(bias)) else 0
            result_types += (jax.ShapeDtypeStruct((b, hq, sq), jnp.float32),
                             jax.ShapeDtypeStruct((b, hq, q_tiles * 64 * d), jnp.float32),
                             jax.ShapeDtypeStruct((b, hq, q_tiles), jnp.int32))
        target = f"fastattn_backward_{platform}"
        fn = jax.ffi.ffi_call(target, result_types, vmap_method="broadcast_all")
        return tuple(fn(q, k, v, out, lse, d_out, d_lse, bias, q_ids, kv_ids, dense, tile_class,
                        **attrs.as_ffi(target)))

    return call


def decode_ffi(platform: str, softmax_scale: float, num_splits: int = 1, cpu_isa: str = "auto",
               cuda_decode: str = "auto"):
    """fn(q, k, v, lengths, page_table) -> (out, lse) on the CPU, (out, lse,
    workspace) on CUDA; page_table empty means a contiguous cache; lse
    float32 [B, Hq] (-inf for a row of length 0). The CUDA
    workspace [B, Hq, num_splits * (D + 2)] float32 holds the split partials
    (an output, not FFI scratch: XLA keeps it alive until the kernels ran).
    cpu_isa: the CPU kernel's level, one of config.CPU_ISAS; cuda_decode:
    the CUDA kernel, one of config.CUDA_DECODE_KERNELS."""
    register()
    for name, value in (("cpu_isa", cpu_isa), ("cuda_decode", cuda_decode)):
        if value not in KERNEL_CODES[name]:
            raise ValueError(f"{name} must be one of {tuple(KERNEL_CODES[name])}, got {value!r}")

    def call(q, k, v, lengths, page_table):
        results = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(q.shape[:2], jnp.float32)]
        attrs = dict(softmax_scale=np.float32(softmax_scale))
        if platform == "cpu":
            attrs["cpu_isa"] = np.int32(KERNEL_CODES["cpu_isa"][cpu_isa])
        if platform == "cuda":
            b, hq, d = q.shape
            results.append(jax.ShapeDtypeStruct((b, hq, num_splits * (d + 2)), jnp.float32))
            attrs["num_splits"] = np.int64(num_splits)
            attrs["cuda_decode"] = np.int32(KERNEL_CODES["cuda_decode"][cuda_decode])
        fn = jax.ffi.ffi_call(f"fastattn_decode_{platform}", tuple(results), vmap_method="broadcast_all")
        return tuple(fn(q, k, v, lengths, page_table, **attrs))

    return call


def _isa_names(mask: int) -> tuple:
    return tuple(name for name, code in KERNEL_CODES["cpu_isa"].items() if code and mask & (1 << code))


@functools.lru_cache(maxsize=None)
def _native_library():
    """The extension as a plain shared library, for its C entry points
    (xla_ffi/cpu/dispatch.cc)."""
    import ctypes

    if _xla_ffi is None:
        raise RuntimeError(f"jax_fastattn's compiled library is missing: {_IMPORT_ERROR}")
    library = ctypes.CDLL(_xla_ffi.__file__)
    library.fastattn_cpu_isa_info.argtypes = [ctypes.POINTER(ctypes.c_uint32)] * 2 + [ctypes.POINTER(ctypes.c_int32)]
    library.fastattn_cpu_isa_obstacle.argtypes = [ctypes.c_int32, ctypes.c_uint32, ctypes.c_uint32,
                                                  ctypes.c_char_p, ctypes.c_int]
    library.fastattn_cpu_isa_obstacle.restype = ctypes.c_int
    return library


def cpu_isa_levels() -> dict:
    """The CPU kernels' instruction-set levels (config.CPU_ISAS names):
    {"supported": levels this CPU and OS can run, "compiled": levels in this
    build, "auto": the level cpu_isa="auto" runs (None if none can)}. From
    cpuid, the OS's XCR0 and Linux's AMX permission, as the kernels see it."""
    import ctypes

    supported, compiled, auto = ctypes.c_uint32(), ctypes.c_uint32(), ctypes.c_int32()
    _native_library().fastattn_cpu_isa_info(ctypes.byref(supported), ctypes.byref(compiled), ctypes.byref(auto))
    names = {code: name for name, code in KERNEL_CODES["cpu_isa"].items()}
    return {"supported": _isa_names(supported.value), "compiled": _isa_names(compiled.value),
            "auto": names.get(auto.value) if auto.value else None}


def cpu_isa_obstacle(cpu_isa: str, supported: tuple, compiled: tuple) -> str:
    """Why the CPU kernels would refuse `cpu_isa` on a CPU supporting the
    levels `supported` in a build of `compiled` ("" if they would run it):
    the C++ decision (dispatch.cc isa_obstacle), for CPUs one does not have."""
    import ctypes

    codes = KERNEL_CODES["cpu_isa"]
    buffer = ctypes.create_string_buffer(1024)
    _native_library().fastattn_cpu_isa_obstacle(codes[cpu_isa], sum(1 << codes[n] for n in supported),
                                                sum(1 << codes[n] for n in compiled), buffer, len(buffer))
    return buffer.value.decode()
