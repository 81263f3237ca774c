"""Ascend two-level tiling plans, compressed tiling-mask, tile simulator and
time model (jax_fastattn.ascend). The simulator is checked against a numpy
attention written here, with the band mask built from index arithmetic."""
import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jax_fastattn import flash_attention, masks
from jax_fastattn.ascend import (ASCEND_910A, ASCEND_910B, CompressedMask, fused_time, mask_memory, plan, simulate,
                                 standard_time)
from jax_fastattn.ascend.__main__ import main as cli_main

BIG = 1 << 40


def numpy_attention(q, k, v, band_lo, band_hi, scale):
    """float64 attention; key j visible from query i iff band_lo <= j - i <= band_hi.
    Returns out [B, Sq, Hq, D] and lse [B, Hq, Sq] (-inf for rows that see nothing)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    rel = np.arange(k.shape[1])[None, :] - np.arange(q.shape[1])[:, None]
    visible = (rel >= band_lo) & (rel <= band_hi)
    logits = np.where(visible, logits, -np.inf)
    row_max = logits.max(-1, keepdims=True)
    safe = np.where(np.isfinite(row_max), row_max, 0)
    weights = np.exp(logits - safe)
    total = weights.sum(-1, keepdims=True)
    probs = np.where(total > 0, weights / np.where(total > 0, total, 1), 0)
    out = np.einsum("bhqk,bkhd->bqhd", probs, v)
    lse = np.where(total[..., 0] > 0, safe[..., 0] + np.log(np.where(total[..., 0] > 0, total[..., 0], 1)), -np.inf)
    return out, lse


def random_qkv(batch, q_len, kv_len, q_heads, kv_heads, head_dim, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, q_len, q_heads, head_dim)).astype(dtype)
    k = rng.standard_normal((batch, kv_len, kv_heads, head_dim)).astype(dtype)
    v = rng.standard_normal((batch, kv_len, kv_heads, head_dim)).astype(dtype)
    return q, k, v


# ---------------------------------------------------------------------------
# Plans


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("hw", [ASCEND_910B, ASCEND_910A], ids=["910B", "910A"])
def test_plans_fit_buffers(dtype, head_dim, hw):
    for seq in (1, 1000, 8192, 131072):
        for causal in (False, True):
            for two_level in (False, True):
                tp = plan((1, seq, 32, head_dim), dtype, hw, causal=causal, two_level=two_level)
                for level, (used, capacity) in tp.occupancy.items():
                    assert 0 < used <= capacity, (level, used, capacity, seq, causal, two_level)
                assert tp.level1.block_q % 16 == 0 and tp.level1.block_kv % 16 == 0
    tp = plan((1, 131072, 32, head_dim), dtype, hw)
    assert (tp.level1.block_q, tp.level1.block_kv) == (128, 1024)
    assert tp.level1.vector_rows * tp.level1.block_kv * 4 == 32 * 1024  # CANN's 8 x 1024 fp32 Vector block


def test_plan_that_does_not_fit_raises():
    with pytest.raises(ValueError, match="does not fit.*UB"):
        plan((1, 8192, 8, 128), "float16", level1=(512, 2048))
    with pytest.raises(ValueError, match="does not fit.*L0"):
        plan((1, 8192, 8, 128), "float16", level2=(128, 256, 128))
    with pytest.raises(ValueError, match="does not fit.*L1"):
        plan((1, 8192, 8, 256), "float16", level1=(1024, 1024), level2=(64, 64, 64))
    with pytest.raises(ValueError, match="compressed mask"):
        plan((1, 8192, 8, 64), "float16", causal=True, level1=(128, 1024), compressed_size=1024)
    with pytest.raises(ValueError, match="dtype"):
        plan((1, 128, 8, 64), "float32")
    with pytest.raises(ValueError, match="multiple of 16"):
        plan((1, 128, 8, 64), "float16", level1=(100, 1024))
    with pytest.raises(ValueError, match="shape"):
        plan((1, 128, 8), "float16")
    with pytest.raises(ValueError, match="kv_heads"):
        plan((1, 128, 128, 8, 3, 64), "float16")
    with pytest.raises(ValueError, match="Segments or Dense"):
        ids = np.zeros((1, 64), np.int32)
        plan((1, 64, 2, 64), "float16", mask=masks.Segments(ids, ids))


def test_two_level_needs_far_fewer_syncs():
    for seq in (4096, 32768):
        single = plan((1, seq, 32, 128), "float16", two_level=False)
        two = plan((1, seq, 32, 128), "float16")
        # Without a mask every block is computed: the sync ratio is the block ratio, 1024 / 128.
        assert single.counters.syncs == 8 * two.counters.syncs
        assert two.counters.syncs == 3 * 32 * (seq // 128) * (seq // 1024)
        single_causal = plan((1, seq, 32, 128), "float16", causal=True, two_level=False)
        two_causal = plan((1, seq, 32, 128), "float16", causal=True)
        assert single_causal.counters.syncs >= 6 * two_causal.counters.syncs
        # Each block's keys are clipped to the band, so big blocks compute no more of the diagonal.
        assert two_causal.counters.cube_flops == single_causal.counters.cube_flops
        # Same FLOPs without a mask; the P.V partials exchanged shrink with bigger blocks.
        assert single.counters.cube_flops == two.counters.cube_flops
        assert two.counters.bytes["l0c_out"] < single.counters.bytes["l0c_out"]


def test_causal_plan_skips_empty_blocks():
    full = plan((1, 4096, 4, 128), "float16")
    causal = plan((1, 4096, 4, 128), "float16", causal=True)
    nq, nk = 4096 // 128, 4096 // 1024
    # Query block i (rows 128 i .. 128 i + 127) needs kv blocks 0 .. (128 i + 127) // 1024.
    expected = sum((128 * i + 127) // 1024 + 1 for i in range(nq))
    assert causal.counters.blocks == 4 * expected
    assert full.counters.blocks == 4 * nq * nk
    # A block is partial iff it holds the diagonal: one per query block.
    assert causal.counters.partial_blocks == 4 * nq


# ---------------------------------------------------------------------------
# Simulator


SIM_CASES = {
    # name: (B, Sq, Skv, Hq, Hkv, D, mask kwargs, band (lo, hi) for the numpy reference, plan kwargs)
    "odd-full": ((1, 77, 100, 2, 2, 24), {}, (-BIG, BIG), dict(level1=(32, 64), level2=(16, 32, 16))),
    "odd-causal-bottom-right": ((2, 45, 70, 2, 1, 40), dict(causal=True), (-BIG, 25),
                                dict(level1=(16, 32), level2=(16, 16, 16))),
    "causal-top-left-gqa": ((1, 70, 50, 4, 2, 32), dict(mask=masks.Causal(align="top_left")), (-BIG, 0),
                            dict(level1=(32, 32), level2=(16, 16, 32))),
    "sliding-window": ((1, 90, 90, 2, 2, 32), dict(mask=masks.SlidingWindow(17, 5)), (-17, 5),
                       dict(level1=(32, 48), level2=(16, 16, 16))),
    "causal-window-empty-rows": ((1, 60, 33, 2, 2, 16), dict(mask=masks.SlidingWindow(3, 0, align="top_left")),
                                 (-3, 0), dict(level1=(16, 16), level2=(16, 16, 16))),
    "default-two-level-gqa": ((1, 130, 1100, 4, 2, 64), dict(causal=True), (-BIG, 970), {}),
    "single-level": ((1, 150, 150, 2, 2, 64), dict(mask=masks.SlidingWindow(40, None)), (-40, BIG),
                     dict(two_level=False)),
}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", list(SIM_CASES))
def test_simulator_matches_reference(case, dtype):
    shape, mask_kwargs, (lo, hi), plan_kwargs = SIM_CASES[case]
    batch, q_len, kv_len, q_heads, kv_heads, head_dim = shape
    np_dtype = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    q, k, v = random_qkv(*shape, np_dtype, seed=len(case))
    result = simulate(q, k, v, **mask_kwargs, **plan_kwargs)
    out, lse = numpy_attention(q, k, v, lo, hi, 1.0 / np.sqrt(head_dim))
    assert result.out.dtype == np_dtype and result.out.shape == q.shape
    # P is rounded to the input dtype before P.V (as the Cube reads it): that is the only rounding.
    atol = 3e-3 if dtype == "float16" else 2e-2
    np.testing.assert_allclose(result.out.astype(np.float32), out, atol=atol, rtol=0)
    np.testing.assert_array_equal(np.isneginf(result.lse), np.isneginf(lse))
    seen = np.isfinite(lse)
    np.testing.assert_allclose(result.lse[seen], lse[seen], atol=1e-4, rtol=1e-5)
    # The simulator counts what it moves; the plan computes the same in closed form.
    assert result.counters == result.plan.counters
    assert result.counters.syncs == 3 * result.counters.blocks


def test_simulator_fully_masked_rows_are_zero():
    q, k, v = random_qkv(1, 60, 33, 2, 2, 16, np.float16)
    result = simulate(q, k, v, mask=masks.SlidingWindow(3, 0, align="top_left"), level1=(16, 16))
    assert np.all(result.out[0, 36:] == 0) and np.all(np.isneginf(result.lse[0, :, 36:]))


def test_simulator_matches_package_reference_and_cpu_kernel():
    """Same band mask through the library's reference and its CPU kernel (which takes the
    band as two integers, no mask array)."""
    from jax_fastattn.reference import attention_reference
    q, k, v = random_qkv(1, 64, 96, 2, 2, 32, np.float16, seed=3)
    mask = masks.SlidingWindow(20, 4)
    result = simulate(q, k, v, mask=mask, level1=(32, 32))
    mplan = masks.make_plan(mask, False, 1, 2, 64, 96)
    ref_out, ref_lse = attention_reference(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), mplan,
                                           softmax_scale=1.0 / np.sqrt(32))
    np.testing.assert_allclose(result.out.astype(np.float32), np.asarray(ref_out), atol=3e-3)
    np.testing.assert_allclose(result.lse, np.asarray(ref_lse), atol=1e-4)
    cpu_out = flash_attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), mask=mask, backend="cpu")
    np.testing.assert_allclose(result.out.astype(np.float32), np.asarray(cpu_out), atol=3e-3)


def test_simulator_rejects_bad_input():
    q, k, v = random_qkv(1, 16, 16, 2, 2, 16, np.float16)
    with pytest.raises(ValueError, match="dtype"):
        simulate(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32))
    with pytest.raises(ValueError, match="q must be"):
        simulate(q[0], k, v)
    with pytest.raises(ValueError, match="planned for"):
        simulate(q, k, v, tiling=plan((1, 32, 2, 16), "float16"))


# ---------------------------------------------------------------------------
# Compressed tiling-mask


BANDS = [  # (mask, Sq, Skv)
    (masks.Causal(), 300, 300), (masks.Causal(), 200, 333), (masks.Causal(align="top_left"), 333, 200),
    (masks.SlidingWindow(37, 0), 300, 300), (masks.SlidingWindow(5, 9), 250, 180),
    (masks.SlidingWindow(None, 20, align="top_left"), 120, 260), (masks.SlidingWindow(0, 0), 100, 100),
]


@pytest.mark.parametrize("size", [64, 2048])
@pytest.mark.parametrize("mask, q_len, kv_len", BANDS)
def test_compressed_slices_equal_dense_mask_on_every_tile(mask, q_len, kv_len, size):
    compressed = CompressedMask(size)
    mplan = masks.make_plan(mask, False, 1, 1, q_len, kv_len)
    dense = np.asarray(masks.materialize(mplan))[0, 0]
    rel = np.arange(kv_len)[None, :] - np.arange(q_len)[:, None]
    assert np.array_equal(dense, (rel >= max(mplan.band_lo, -BIG)) & (rel <= min(mplan.band_hi, BIG)))
    for tile_q, tile_kv in ((16, 32), (32, 16), (16, 48)):
        classes = np.asarray(masks.classify_tiles(mplan, tile_q, tile_kv))[0, 0]
        for qi, q0 in enumerate(range(0, q_len, tile_q)):
            for ki, k0 in enumerate(range(0, kv_len, tile_kv)):
                sliced = compressed.tile(mplan, q0, k0, tile_q, tile_kv)
                rows, cols = min(tile_q, q_len - q0), min(tile_kv, kv_len - k0)
                real = sliced[:rows, :cols]
                assert np.array_equal(real, dense[q0:q0 + rows, k0:k0 + cols]), (q0, k0)
                # The slice classifies the tile as masks.classify_tiles does.
                own_class = masks.FULL if real.all() else (masks.PARTIAL if real.any() else masks.EMPTY)
                assert own_class == classes[qi, ki], (q0, k0)


def test_compressed_mask_is_lower_triangular_2048():
    compressed = CompressedMask()
    assert compressed.matrix.shape == (2048, 2048) and compressed.nbytes == 4 * 2**20
    assert np.array_equal(compressed.matrix, np.tril(np.ones((2048, 2048), bool)))


def test_mask_memory_dense_vs_compressed_vs_band():
    memory = mask_memory(32768, 32768)
    assert memory["dense_bytes"] == 2**30                  # bool [32K, 32K]
    assert memory["compressed_bytes"] == 4 * 2**20         # bool [2048, 2048]
    assert memory["band_bytes"] == 16                       # (band_lo, band_hi), the CPU kernel's form
    assert memory["dense_over_compressed"] == 256
    assert mask_memory(8192, 8192, heads=32)["dense_bytes"] == 32 * 8192 * 8192


# ---------------------------------------------------------------------------
# Time model (roofline-style) and CLI


def test_time_model_orders_plans():
    for seq in (8192, 32768):
        single = fused_time(plan((1, seq, 32, 128), "float16", causal=True, two_level=False))
        two = fused_time(plan((1, seq, 32, 128), "float16", causal=True))
        standard = standard_time((1, seq, 32, 128), "float16", ASCEND_910B, causal=True)
        assert two.seconds < single.seconds < standard.seconds
        assert single.bound == "latency"            # 128 x 128 blocks cannot hide three handoffs each
        # The fused kernel cannot beat the Cube peak on the FLOPs it runs.
        cube_floor = plan((1, seq, 32, 128), "float16", causal=True).counters.cube_flops / 354e12
        assert two.seconds >= cube_floor
    assert not standard_time((1, 32768, 32, 128), "float16", ASCEND_910B).fits
    assert standard_time((1, 8192, 32, 128), "float16", ASCEND_910B).fits
    # Without handoff latency single-level blocks stop being latency-bound.
    no_latency = fused_time(plan((1, 8192, 32, 128), "float16", two_level=False), sync_us=0.0)
    assert no_latency.bound != "latency"


def test_cli_prints_plan_and_writes_json(tmp_path, capsys):
    path = tmp_path / "ascend.json"
    assert cli_main(["--seq", "2048", "--heads", "8", "--head-dim", "64", "--causal", "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "two-level plan" in printed and "MODEL" in printed and "UB" in printed
    row = json.loads(path.read_text())["row"]
    assert row["syncs_single"] > row["syncs_two"] > 0
    assert cli_main(["--seq", "8192", "--head-dim", "64", "--block-kv", "4096"]) == 2  # L2 workspace overflows


def test_cli_table_and_simulate(capsys):
    assert cli_main(["--table", "llama7b"]) == 0
    printed = capsys.readouterr().out
    assert "| 32768 |" in printed and "10.7x" in printed and "OOM" in printed
    assert cli_main(["--seq", "100", "--heads", "2", "--head-dim", "32", "--window", "20", "--simulate"]) == 0
    assert "counters equal the plan's: True" in capsys.readouterr().out
