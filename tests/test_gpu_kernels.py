"""GPU-kernel properties beyond the shared suite (pytest -m gpu): the
persistent sm90a forward across many work items, long GQA sequences in the
backward, the wgmma backwards against the mma.sync one (bit for bit where
they sum in the same order), bitwise reproducibility, and the Volta
kernel's two shared-memory layouts."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import CASES, MMA_SYNC
from helpers import random_qkv
from jax_fastattn import flash_attention, masks
from jax_fastattn.config import KernelConfig
from test_attention import check_forward, check_gradients

pytestmark = pytest.mark.gpu


@pytest.fixture(params=[jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
def cuda(request):
    case = dataclasses.replace(CASES["cuda-bf16"], dtype=request.param)
    why_not = case.available()
    if why_not:
        pytest.skip(why_not)
    return case


@pytest.mark.parametrize("head_dim", [64, 128])
def test_many_work_items_per_cta(cuda, head_dim):
    """Enough 128-row query blocks (18 x 32 = 576) that the persistent sm90a
    forward gives each CTA several items: its stage ring and Q buffer run on
    across items, with no mask, under the band-only and the general mask,
    with whole query blocks that see nothing between others."""
    batch, length = 2, 2304
    q, k, v = random_qkv(11, batch, length, length, 16, 4, head_dim, cuda.dtype)
    check_forward(cuda, q, k, v, causal=True)
    check_forward(cuda, q, k, v)  # 176-key steps at D=128 (2304 = 13 x 176 + 16)
    ids = np.repeat(np.arange(length // 256), 256)[None].repeat(batch, 0)
    q_ids = jnp.asarray(ids, jnp.int32).at[0, 128:384].set(-1)  # two blocks see nothing
    out, lse = check_forward(cuda, q, k, v, mask=masks.Segments(q_ids, jnp.asarray(ids, jnp.int32)))
    assert np.all(np.asarray(out, np.float32)[0, 128:384] == 0)
    assert np.all(np.isneginf(np.asarray(lse)[0, :, 128:384]))


@pytest.mark.parametrize("mask", [None, masks.Causal(), masks.SlidingWindow(200, 30)],
                         ids=["full", "causal", "window"])
def test_long_sequences_gqa_gradients(cuda, mask):
    """Many q tiles per key block and many key tiles per query block: the
    sm90a kernels' stage rings wrap several times, and items of other heads of
    the GQA group follow each other."""
    for head_dim in (64, 128):
        q, k, v = random_qkv(16, 1, 1100, 1030, 8, 2, head_dim, cuda.dtype)
        check_gradients(cuda, q, k, v, mask=mask)


def _grads(q, k, v, config=None, **kwargs):
    def loss(q, k, v):
        out = flash_attention(q, k, v, backend="cuda", config=config, **kwargs)
        return jnp.sum(out.astype(jnp.float32) ** 2)
    return jax.grad(loss, (0, 1, 2))(q, k, v)


WINDOW_SEGMENTS = masks.Segments(jnp.asarray(np.repeat(np.arange(5), 140)[None].repeat(2, 0), jnp.int32),
                                 jnp.asarray(np.repeat(np.arange(5), 130)[None].repeat(2, 0), jnp.int32))


@pytest.mark.parametrize("mask", [None, masks.Causal(), masks.SlidingWindow(100, 0), WINDOW_SEGMENTS],
                         ids=["full", "causal", "window", "segments"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_wgmma_backwards_match_mma_sync(cuda, mask, head_dim):
    """Where the wgmma backwards run (sm_90): the two-pass one ("wgmma")
    sums every gradient element in the same order as the mma.sync kernels
    (q tiles, then 16-wide k steps), so they agree bit for bit; so do dK
    and dV of the one-pass ones (same kernel, same order), whose dQ is
    summed per 128-key block and then across blocks, so it agrees to
    rounding (a wrong lse, delta, mask column or dS tile would not). "auto"
    is the ordered one-pass kernel, bit for bit."""
    q, k, v = random_qkv(18, 2, 700, 650, 8, 2, head_dim, cuda.dtype)
    mma_sync = _grads(q, k, v, config=KernelConfig(cuda_backward="mma_sync"), mask=mask)
    scale = max(float(jnp.max(jnp.abs(mma_sync[0].astype(jnp.float32)))), 1e-3)
    results = {}
    for choice in ("wgmma", "auto", "wgmma_ordered", "wgmma_atomic"):
        grads = results[choice] = _grads(q, k, v, config=KernelConfig(cuda_backward=choice), mask=mask)
        for a, b in zip(grads[1:], mma_sync[1:]):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=choice)
        dq, expected = np.asarray(grads[0], np.float32), np.asarray(mma_sync[0], np.float32)
        if choice == "wgmma":
            np.testing.assert_array_equal(dq, expected)
        else:
            np.testing.assert_allclose(dq, expected, atol=2e-2 * scale, rtol=2e-2, err_msg=choice)
    np.testing.assert_array_equal(np.asarray(results["auto"][0], np.float32),
                                  np.asarray(results["wgmma_ordered"][0], np.float32))


@pytest.mark.parametrize("choice", ["wgmma_ordered", "wgmma_atomic"])
def test_one_pass_backward_rows_that_see_nothing(cuda, choice):
    """Query rows whose segment has no keys (segment -1) get dQ = 0 exactly,
    also where whole q tiles see nothing (the fused backward's dQ workspace
    is never written for them); the other rows match mma.sync."""
    length = 640
    ids = np.repeat(np.arange(length // 128), 128)[None]
    q_ids = jnp.asarray(ids, jnp.int32).at[0, 128:300].set(-1)
    mask = masks.Segments(q_ids, jnp.asarray(ids, jnp.int32))
    q, k, v = random_qkv(19, 1, length, length, 4, 4, 128, cuda.dtype)
    grads = _grads(q, k, v, config=KernelConfig(cuda_backward=choice), mask=mask)
    mma_sync = _grads(q, k, v, config=KernelConfig(cuda_backward="mma_sync"), mask=mask)
    dq = np.asarray(grads[0], np.float32)
    assert np.all(dq[0, 128:300] == 0)
    np.testing.assert_allclose(dq, np.asarray(mma_sync[0], np.float32), atol=2e-2, rtol=2e-2)


def test_one_pass_backward_reproducible_across_grid_orders(cuda):
    """dQ of the ordered one-pass backward is the same bits whatever the
    number of heads and batch rows beside it (the grid's dispatch order
    changes with them, the summation order does not)."""
    q, k, v = random_qkv(20, 3, 1500, 1500, 8, 2, 128, cuda.dtype)
    ordered = KernelConfig(cuda_backward="wgmma_ordered")
    alone = _grads(q[:1, :, :4], k[:1, :, :1], v[:1, :, :1], config=ordered, causal=True)
    together = _grads(q, k, v, config=ordered, causal=True)
    again = _grads(q, k, v, config=ordered, causal=True)
    for a, b in zip(together, again):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b[:1, :, :a.shape[2]], np.float32))


def test_bitwise_reproducible_jit_and_vmap(cuda):
    q, k, v = random_qkv(14, 2, 520, 520, 8, 2, 128, cuda.dtype)
    grad = jax.jit(lambda q, k, v: _grads(q, k, v, causal=True))
    first, second = grad(q, k, v), grad(q, k, v)
    for a, b in zip(first, second):  # dQ summed in a fixed order: the same bits every run
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    for a, b in zip(first, _grads(q, k, v, causal=True)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    stacked = [jnp.stack([x, x * 0.5]) for x in (q, k, v)]
    batched = jax.vmap(lambda q, k, v: _grads(q, k, v, causal=True))(*stacked)
    for a, b in zip(batched, first):
        np.testing.assert_array_equal(np.asarray(a[0], np.float32), np.asarray(b, np.float32))


def test_mma_sync_forward_long_masks(cuda):
    """The mma.sync forward (what sm80/sm89 run) on the shapes where sm90
    takes wgmma: full, causal and windowed, D 64 and 128."""
    case = dataclasses.replace(CASES["cuda-mma_sync-f16"], dtype=jnp.bfloat16)
    for head_dim in (64, 128):
        q, k, v = random_qkv(10, 2, 300, 257, 4, 2, head_dim, case.dtype)
        for mask in (None, masks.Causal(), masks.SlidingWindow(50, 10)):
            check_forward(case, q, k, v, mask=mask)
    assert case.config == MMA_SYNC


def test_volta_layouts_agree():
    """The swizzled (bank-conflict-free) and the naive shared-memory layouts
    of the Volta kernel compute the same attention."""
    case = CASES["volta-f16"]
    why_not = case.available()
    if why_not:
        pytest.skip(why_not)
    q, k, v = random_qkv(30, 2, 300, 257, 4, 2, 64, jnp.float16)
    swizzled = flash_attention(q, k, v, causal=True, backend="volta")
    naive = flash_attention(q, k, v, causal=True, backend="volta", config=KernelConfig(volta_layout="naive"))
    np.testing.assert_allclose(np.asarray(swizzled, np.float32), np.asarray(naive, np.float32), atol=2e-3)
    check_forward(case, q, k, v, causal=True)
