"""Bad input raises a clear error naming the argument, before any jax error."""
import jax
import jax.numpy as jnp
import pytest

from jax_fastattn import decode_attention, flash_attention, masks

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
    ((jnp.zeros((1, 4, 2, 300)),) * 3, {}, ValueError, r"head dim D must be in \[1, 256\]"),
    ((q.astype(jnp.int32), k, v), {}, TypeError, r"q must be float32, bfloat16 or float16, got int32"),
    ((q, k.astype(jnp.bfloat16), v), {}, TypeError, r"q, k and v must share one dtype"),
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
    with pytest.raises(error, match=pattern):
        flash_attention(*args, **kwargs)


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
])
def test_decode_errors(args, error, pattern):
    with pytest.raises(error, match=pattern):
        decode_attention(*args)


def test_kernel_checks_shapes_at_ffi_boundary():
    """The C++ handler rejects inconsistent buffers with a message naming them."""
    from jax_fastattn import ffi, sharding
    attrs = ffi.CallAttrs(1.0, -masks.UNBOUNDED, masks.UNBOUNDED, 64, 128)
    call = sharding.forward_call("cpu", attrs)
    bad_tiles = jnp.zeros((1, 1, 5, 5), jnp.int8)  # wrong tile count
    with pytest.raises(Exception, match="tile_class must have shape"):
        call(q, k, v, ffi.absent(), ffi.absent(jnp.int32), ffi.absent(jnp.int32), ffi.absent(jnp.bool_),
             bad_tiles)[0].block_until_ready()
