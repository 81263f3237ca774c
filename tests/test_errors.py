"""Bad input raises a clear error naming the argument, before any jax error.
Every such error is an ArgumentError: a ValueError (shared/DESIGN.md's
promise for unsupported combinations) that is also a TypeError."""
import jax
import jax.numpy as jnp
import pytest

from jax_fastattn import backends, decode_attention, flash_attention, masks
from jax_fastattn.config import KernelConfig, TileConfig
from jax_fastattn.errors import ArgumentError

q = jnp.zeros((2, 8, 4, 16))
k = jnp.zeros((2, 10, 2, 16))
v = jnp.zeros((2, 10, 2, 16))


@pytest.mark.parametrize("args,kwargs,error,pattern", [
    ((q[0], k, v), {}, ValueError, r"q must have rank 4"),
    ((q, k[..., 0], v), {}, ValueError, r"k must have rank 4"),
    ((q, k, v[:, :5]), {}, ValueError, r"k and v must have the same shape"),
    ((q, k[:1], v[:1]), {}, ValueError, r"k/v batch \(1\) must equal q batch \(2\)"),
    ((q, k[..., :8], v[..., :8]), {}, ValueError, r"k/v head dim \(8\) must equal q head dim \(16\)"),
    ((q[:, :, :3], k, v), {}, ValueError, r"q heads \(3\) must be a multiple of k/v heads \(2\)"),
    ((jnp.zeros((1, 4, 2, 300)),) * 3, {}, ValueError, r"head dim D \(q.shape\[-1\]\) must be in \[1, 256\]"),
    ((q.astype(jnp.int32), k, v), {}, TypeError, r"q must be float32, bfloat16 or float16, got int32"),
    ((q, k.astype(jnp.bfloat16), v), {}, ValueError, r"q, k and v must share one dtype"),
    ((q, k, v), {"config": "fast"}, ValueError, r"config must be a jax_fastattn.config.KernelConfig"),
    ((q, k, v), {"backend": "cpu", "config": KernelConfig(cuda_forward="mma_sync")}, ValueError,
     r"config.cuda_forward/cuda_backward choose CUDA kernels, but the call runs on backend='cpu'"),
    ((q, k, v), {"backend": "xla", "config": KernelConfig(volta_layout="naive")}, ValueError,
     r"config.volta_layout"),
    ((q, k, v), {"backend": "xla", "config": KernelConfig(cpu_isa="avx2")}, ValueError,
     r"config.cpu_isa chooses the CPU kernels' instruction-set level, but the call runs on backend='xla'"),
    ((q, k, v), {"backend": "tpu"}, ValueError, r"backend must be one of"),
    ((q, k, v), {"backend": "cuda"}, ValueError, r"backend='cuda' needs a CUDA GPU"),
    ((q, k, v), {"backend": "volta"}, ValueError, r"backend='volta' needs a CUDA GPU"),
    ((q, k, v), {"bias": jnp.zeros((2, 4, 8, 9))}, ValueError, r"bias must have shape \[B\|1, H\|1, Sq, Skv\]"),
    ((q, k, v), {"bias": jnp.zeros((2, 4, 8, 10), jnp.int32)}, TypeError, r"bias must be a float array"),
    ((q, k, v), {"mask": "causal"}, TypeError, r"mask must be a jax_fastattn.masks mask"),
    ((q, k, v), {"mask": masks.Segments(jnp.zeros((2, 7), jnp.int32), jnp.zeros((2, 10), jnp.int32))},
     ValueError, r"mask: Segments q_ids must have shape \[B, Sq\] = \(2, 8\)"),
    ((q, k, v), {"mask": masks.Segments(jnp.zeros((2, 8)), jnp.zeros((2, 10)))},
     TypeError, r"mask: Segments q_ids must be an integer array"),
    ((q, k, v), {"mask": masks.Dense(jnp.ones((2, 3, 8, 10), bool))}, ValueError, r"mask: Dense mask must have shape"),
    ((q, k, v), {"mask": masks.Dense(jnp.ones((2, 4, 8, 10)))}, TypeError, r"mask: Dense mask must be bool"),
    ((q, k, v), {"softmax_scale": jnp.float32(0.5)}, TypeError, r"softmax_scale must be a Python float"),
    ((q, k, v), {"softmax_scale": float("nan")}, ValueError, r"softmax_scale must be finite"),
    ((q, k, v), {"causal": "yes"}, TypeError, r"causal must be a Python bool"),
])
def test_flash_attention_errors(args, kwargs, error, pattern):
    with pytest.raises(error, match=pattern) as raised:
        flash_attention(*args, **kwargs)
    assert isinstance(raised.value, ArgumentError) and isinstance(raised.value, ValueError)


@pytest.mark.parametrize("field,value,pattern", [
    ("cuda_forward", "fast", r"KernelConfig.cuda_forward must be one of \('auto', 'wgmma', 'mma_sync'\)"),
    ("cuda_backward", "", r"KernelConfig.cuda_backward must be one of"),
    ("volta_layout", "tiled", r"KernelConfig.volta_layout must be one of \('swizzled', 'naive'\)"),
])
def test_kernel_config_errors(field, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        KernelConfig(**{field: value})
    with pytest.raises(ValueError, match=r"TileConfig.tile_kv must be a positive int"):
        TileConfig(8, 0)


@pytest.fixture
def pretend_gpu_kernels(monkeypatch):
    """The checks of the GPU backends, on a machine without a GPU: the
    kernels' availability is taken as given, so the dtype, head-dim and config
    checks that run before any kernel call are what is tested."""
    monkeypatch.setattr(backends, "_check_available", lambda name, op: None)


@pytest.mark.parametrize("backend,dtype,head_dim,pattern", [
    ("cuda", jnp.float32, 64, r"backend='cuda' takes bfloat16 or float16 inputs, got q of dtype float32"),
    ("volta", jnp.bfloat16, 64, r"backend='volta' takes float16 inputs, got q of dtype bfloat16"),
    ("volta", jnp.float16, 200, r"backend='volta' supports head dims up to 128, got q.shape\[-1\] = 200"),
])
def test_unsupported_kernel_combinations(pretend_gpu_kernels, backend, dtype, head_dim, pattern):
    x = jnp.zeros((1, 8, 2, head_dim), dtype)
    with pytest.raises(ValueError, match=pattern) as raised:
        flash_attention(x, x, x, backend=backend)
    assert isinstance(raised.value, TypeError)  # both kinds of caller are served


@pytest.mark.parametrize("head_dim,bias,pattern", [
    (200, False, r"config.cuda_forward='wgmma': the wgmma kernels take head dims up to 64 or 128"),
    (64, True, r"config.cuda_backward='wgmma': the wgmma backward has no bias gradient"),
])
def test_impossible_wgmma_requests(pretend_gpu_kernels, head_dim, bias, pattern):
    x = jnp.zeros((1, 8, 2, head_dim), jnp.bfloat16)
    config = KernelConfig(cuda_forward="wgmma" if not bias else "auto", cuda_backward="wgmma")
    with pytest.raises(ValueError, match=pattern):
        flash_attention(x, x, x, backend="cuda", config=config, bias=jnp.zeros((1, 1, 8, 8)) if bias else None)


@pytest.mark.parametrize("choice", ["wgmma_ordered", "wgmma_atomic"])
@pytest.mark.parametrize("head_dim,bias", [(200, False), (64, True)])
def test_impossible_one_pass_backward_requests(pretend_gpu_kernels, choice, head_dim, bias):
    """The one-pass wgmma backwards have the wgmma kernels' limits, named as
    the option the caller set."""
    x = jnp.zeros((1, 8, 2, head_dim), jnp.bfloat16)
    why = "the wgmma backward has no bias gradient" if bias else "the wgmma kernels take head dims up to 64 or 128"
    with pytest.raises(ValueError, match=rf"config.cuda_backward='{choice}': {why}"):
        flash_attention(x, x, x, backend="cuda", config=KernelConfig(cuda_backward=choice),
                        bias=jnp.zeros((1, 1, 8, 8)) if bias else None)


def test_decode_row_rule_and_auto(monkeypatch, pretend_gpu_kernels):
    """The CUDA decode kernel reads whole 16-byte rows: backend="cuda" with
    another head dim raises naming q's last axis; "auto" takes xla."""
    monkeypatch.setattr(backends, "_auto", lambda op: "cuda")
    with pytest.raises(ValueError, match=r"q.shape\[-1\] must be a multiple of 8 for bfloat16, got 12"):
        backends.resolve("cuda", "decode", jnp.bfloat16, 12)
    assert backends.resolve("auto", "decode", jnp.bfloat16, 12).name == "xla"
    assert backends.resolve("auto", "decode", jnp.float32, 64).name == "cuda"
    assert backends.resolve("auto", "attention", jnp.bfloat16, 12).name == "cuda"


def test_zero_query_heads_are_an_error():
    x = jnp.zeros((1, 4, 0, 8))
    with pytest.raises(ValueError, match=r"q heads \(0\) must be a multiple"):
        flash_attention(x, jnp.zeros((1, 4, 1, 8)), jnp.zeros((1, 4, 1, 8)))


def test_fixed_kernel_tiles_cannot_be_configured(pretend_gpu_kernels):
    x = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"config.tiles: backend='cuda' has fixed tiles"):
        flash_attention(x, x, x, backend="cuda", config=KernelConfig(tiles=TileConfig(32, 32)))


def test_auto_takes_xla_for_what_the_gpu_kernel_does_not(monkeypatch, pretend_gpu_kernels):
    """Documented: on a GPU, "auto" runs float32 (and, on Volta, D > 128) on
    the pure-JAX backend; an explicit backend raises instead."""
    monkeypatch.setattr(backends, "_auto", lambda op: "cuda")
    assert backends.resolve("auto", "attention", jnp.float32, 64).name == "xla"
    assert backends.resolve("auto", "attention", jnp.bfloat16, 64).name == "cuda"
    with pytest.raises(ArgumentError):
        backends.resolve("cuda", "attention", jnp.float32, 64)


@pytest.mark.parametrize("factory,pattern", [
    (lambda: masks.Causal(align="top"), r"align must be one of"),
    (lambda: masks.SlidingWindow(-1, 0), r"SlidingWindow left must be a non-negative int"),
    (lambda: masks.SlidingWindow(2, 1.5), r"SlidingWindow right must be a non-negative int"),
    (lambda: masks.Causal() & "x", r"can only intersect masks"),
])
def test_mask_construction_errors(factory, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        factory()


def test_softmax_scale_traced_under_jit():
    with pytest.raises(TypeError, match="softmax_scale must be a Python float"):
        jax.jit(lambda s: flash_attention(q, k, v, softmax_scale=s))(0.5)


@pytest.mark.parametrize("args,error,pattern", [
    ((q, k, v, jnp.array([1, 2])), ValueError, r"q must have rank 3 \[B, Hq, D\]"),
    ((q[:, 0], k[0], v, jnp.array([1, 2])), ValueError, r"k_cache must have rank 4"),
    ((q[:, 0], k, v, jnp.array([1, 2, 3])), ValueError, r"lengths must have shape \[B\] = \(2,\)"),
    ((q[:, 0], k, v, jnp.array([1.0, 2.0])), TypeError, r"lengths must be an integer array"),
    ((q[:, 0], k, v[:, :7], jnp.array([1, 2])), ValueError,
     r"k_cache and v_cache must have the same shape"),
    ((q[:, 0], k, v.astype(jnp.float16), jnp.array([1, 2])), ValueError,
     r"q, k_cache and v_cache must share one dtype"),
    ((q[:, 0], k[..., :8], v[..., :8], jnp.array([1, 2])), ValueError,
     r"k_cache/v_cache head dim \(8\) must equal q head dim \(16\)"),
    ((q[:, 0, :3], k, v, jnp.array([1, 2])), ValueError,
     r"q heads \(3\) must be a multiple of k_cache/v_cache heads \(2\)"),
])
def test_decode_errors(args, error, pattern):
    with pytest.raises(error, match=pattern) as raised:
        decode_attention(*args)
    assert isinstance(raised.value, ArgumentError)


@pytest.mark.parametrize("kwargs,pattern", [
    ({"config": "fast"}, r"config must be a jax_fastattn.config.KernelConfig"),
    ({"config": KernelConfig(cuda_forward="mma_sync")},
     r"config.cuda_forward choose attention kernels; decode_attention takes only config.cpu_isa"),
    ({"backend": "xla", "config": KernelConfig(cpu_isa="avx2")},
     r"config.cpu_isa chooses the CPU kernels' instruction-set level, but the call runs on backend='xla'"),
])
def test_decode_config_errors(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern) as raised:
        decode_attention(q[:, 0], k, v, jnp.array([1, 2]), **kwargs)
    assert isinstance(raised.value, ArgumentError)


def test_kernel_checks_shapes_at_ffi_boundary():
    """The C++ handler rejects inconsistent buffers with a message naming them."""
    from jax_fastattn import ffi, sharding
    attrs = ffi.CallAttrs(1.0, -masks.UNBOUNDED, masks.UNBOUNDED, 64, 128)
    call = sharding.forward_call("cpu", attrs)
    bad_tiles = jnp.zeros((1, 1, 5, 5), jnp.int8)  # wrong tile count
    with pytest.raises(Exception, match="tile_class must have shape"):
        call(q, k, v, ffi.absent(), ffi.absent(jnp.int32), ffi.absent(jnp.int32), ffi.absent(jnp.bool_),
             bad_tiles)[0].block_until_ready()
