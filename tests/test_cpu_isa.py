"""The CPU kernels at every instruction-set level this machine runs
(KernelConfig.cpu_isa), against a plain numpy / jax.numpy attention written
here: forward (out and lse), backward and decode, float32 and bfloat16,
causal or not, GQA, odd lengths. Levels the CPU lacks must raise, never
fall back or crash."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_fastattn import decode_attention, ffi, flash_attention
from jax_fastattn.config import CPU_ISAS, KernelConfig, TileConfig

LEVELS = tuple(name for name in CPU_ISAS if name != "auto")
# Absolute error allowed after scaling by the largest reference value: bf16
# inputs and outputs carry 8 significant bits (the kernels also round the
# softmax weights to bf16 before P V on the bf16 levels).
TOLERANCE = {"float32": 2e-5, "bfloat16": 2.5e-2}
GRAD_TOLERANCE = {"float32": 1e-4, "bfloat16": 6e-2}


def _levels():
    return ffi.cpu_isa_levels()


def _runnable(level):
    levels = _levels()
    return level in levels["supported"] and level in levels["compiled"]


def _inputs(dtype, b=1, sq=77, skv=77, hq=4, hkv=2, d=64, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, sq, hq, d), dtype=np.float32)
    k = rng.standard_normal((b, skv, hkv, d), dtype=np.float32)
    v = rng.standard_normal((b, skv, hkv, d), dtype=np.float32)
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _attention(q, k, v, causal, scale):
    """Plain attention in float32, layout [B, S, H, D]; returns (out, lse
    [B, H, Sq]). Bottom-right causal alignment, as flash_attention's."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") * scale
    if causal:
        sq, skv = q.shape[1], k.shape[1]
        visible = jnp.arange(skv)[None, :] <= jnp.arange(sq)[:, None] + (skv - sq)
        logits = jnp.where(visible, logits, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1)
    weights = jnp.exp(logits - lse[..., None])
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision="highest"), lse


def _close(actual, expected, tolerance):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(actual, expected, atol=tolerance * scale, rtol=0)


def test_levels_query_and_auto_picks_the_best():
    levels = _levels()
    assert set(levels["supported"]) <= set(LEVELS) and set(levels["compiled"]) <= set(LEVELS)
    both = [name for name in LEVELS if name in levels["supported"] and name in levels["compiled"]]
    assert levels["auto"] == (both[-1] if both else None)
    # cpuid levels nest: a CPU with one level has every lower one.
    assert list(levels["supported"]) == list(LEVELS[:len(levels["supported"])])


def test_dispatch_refuses_levels_the_cpu_or_build_lacks():
    """The C++ decision itself, for CPUs this machine is not."""
    assert ffi.cpu_isa_obstacle("amx", LEVELS, LEVELS) == ""
    message = ffi.cpu_isa_obstacle("amx", ("avx2", "avx512"), LEVELS)
    assert "cpu_isa='amx'" in message and "avx2, avx512" in message
    assert "not compiled" in ffi.cpu_isa_obstacle("avx2", LEVELS, ("amx",))
    assert ffi.cpu_isa_obstacle("auto", ("avx2",), LEVELS) == ""
    assert "cpu_isa='auto'" in ffi.cpu_isa_obstacle("auto", (), LEVELS)


def test_bad_cpu_isa_is_a_value_error():
    with pytest.raises(ValueError, match="cpu_isa"):
        KernelConfig(cpu_isa="sse2")
    with pytest.raises(ValueError, match="cpu_isa"):
        ffi.decode_ffi("cpu", 1.0, cpu_isa="avx1024")


@pytest.mark.parametrize("level", LEVELS)
def test_level_the_cpu_lacks_raises(level):
    if _runnable(level):
        pytest.skip(f"this CPU runs {level}")
    q, k, v = _inputs(jnp.float32, sq=8, skv=8)
    with pytest.raises(Exception, match="cpu_isa"):
        jax.block_until_ready(flash_attention(q, k, v, backend="cpu", config=KernelConfig(cpu_isa=level)))


def _run_forward(level, dtype, causal, shape):
    if not _runnable(level):
        pytest.skip(f"this CPU or build lacks {level}")
    q, k, v = _inputs(dtype, **shape)
    scale = q.shape[-1] ** -0.5
    out, lse = flash_attention(q, k, v, causal=causal, return_lse=True, backend="cpu",
                               config=KernelConfig(cpu_isa=level))
    expected_out, expected_lse = _attention(q, k, v, causal, scale)
    assert out.dtype == dtype
    _close(out, expected_out, TOLERANCE[jnp.dtype(dtype).name])
    _close(lse, expected_lse, TOLERANCE[jnp.dtype(dtype).name])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("level", ("auto",) + LEVELS)
def test_forward_at_every_level(level, dtype, causal):
    # GQA (4 q heads on 2 kv heads), odd length, several q and kv tiles.
    _run_forward(level, dtype, causal, dict(b=2, sq=150, skv=150, hq=4, hkv=2, d=64))


@pytest.mark.parametrize("level", LEVELS)
def test_forward_odd_head_dim_and_fewer_queries(level):
    _run_forward(level, jnp.bfloat16, True, dict(b=1, sq=19, skv=77, hq=3, hkv=1, d=40))


def _run_backward(level, dtype, causal, shape, tiles=None):
    if not _runnable(level):
        pytest.skip(f"this CPU or build lacks {level}")
    q, k, v = _inputs(dtype, seed=1, **shape)
    d_out = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape, dtype=np.float32), dtype)
    scale = q.shape[-1] ** -0.5
    config = KernelConfig(cpu_isa=level, tiles=tiles)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * d_out.astype(jnp.float32))

    ours = jax.grad(loss(lambda q, k, v: flash_attention(q, k, v, causal=causal, backend="cpu", config=config)),
                    argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(loss(lambda q, k, v: _attention(q, k, v, causal, scale)[0]), argnums=(0, 1, 2))(
        *(x.astype(jnp.float32) for x in (q, k, v)))
    for got, want in zip(ours, expected):
        assert got.dtype == dtype
        _close(got, want, GRAD_TOLERANCE[jnp.dtype(dtype).name])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("level", LEVELS)
def test_backward_at_every_level(level, dtype):
    _run_backward(level, dtype, True, dict(b=1, sq=77, skv=77, hq=4, hkv=2, d=32))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("level", LEVELS)
def test_backward_over_several_kv_chunks(level, dtype, causal):
    # One (batch, kv head) item and 9 kv tiles of 128: the backward splits the
    # keys into 2 chunks (64 items wanted, chunks of >= 4 tiles), so dQ is
    # summed from partials.
    _run_backward(level, dtype, causal, dict(b=1, sq=150, skv=1100, hq=3, hkv=1, d=64))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("level", LEVELS)
def test_bf16_backward_odd_head_dim_and_partial_tiles(level, causal):
    # Tiles of whole 32-row / 32-key chunks, where the bf16 levels run all five
    # products in bf16: head dim 40 (zero padded to 64), a last q tile of 35
    # rows and a last kv tile of 11 keys, GQA 6/2.
    _run_backward(level, jnp.bfloat16, causal, dict(b=2, sq=99, skv=203, hq=6, hkv=2, d=40),
                  tiles=TileConfig(tile_q=64, tile_kv=96))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("level", LEVELS)
def test_backward_with_q_tiles_not_a_multiple_of_16(level, dtype):
    # q tiles starting at rows 24, 48, ...: the AMX operands read 16-row
    # blocks from there, past the last tile's rows.
    _run_backward(level, dtype, True, dict(b=1, sq=41, skv=70, hq=2, hkv=1, d=32),
                  tiles=TileConfig(tile_q=24, tile_kv=32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("level", LEVELS)
def test_decode_at_every_level(level, dtype):
    if not _runnable(level):
        pytest.skip(f"this CPU or build lacks {level}")
    rng = np.random.default_rng(3)
    b, smax, hq, hkv, d = 2, 200, 8, 2, 64
    q = jnp.asarray(rng.standard_normal((b, hq, d), dtype=np.float32), dtype)
    k = jnp.asarray(rng.standard_normal((b, smax, hkv, d), dtype=np.float32), dtype)
    v = jnp.asarray(rng.standard_normal((b, smax, hkv, d), dtype=np.float32), dtype)
    lengths = np.array([150, 37], np.int32)
    scale = d ** -0.5
    out = decode_attention(q, k, v, jnp.asarray(lengths), softmax_scale=scale, backend="cpu",
                           config=KernelConfig(cpu_isa=level))
    for row in range(b):
        n = int(lengths[row])
        expected, _ = _attention(q[row:row + 1, None], k[row:row + 1, :n], v[row:row + 1, :n], False, scale)
        _close(out[row], expected[0, 0], TOLERANCE[jnp.dtype(dtype).name])


def _masked_attention(q, k, v, visible, bias, scale):
    """_attention with a [B, Sq, Skv] visibility mask and an additive bias
    [1, H, Sq, Skv]; rows that see no key give zeros."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") * scale + bias
    logits = jnp.where(visible[:, None], logits, -1e30)
    weights = jax.nn.softmax(logits, axis=-1) * jnp.any(visible, axis=-1)[:, None, :, None]
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision="highest")


@pytest.mark.parametrize("level", LEVELS)
def test_bf16_segments_padding_bias_small_tiles(level):
    """The bf16 paths' packing of padding keys (negative segment ids), the
    bias path and tiles whose rows are not a multiple of 16, forward and
    backward."""
    from jax_fastattn import masks
    from jax_fastattn.config import TileConfig

    if not _runnable(level):
        pytest.skip(f"this CPU or build lacks {level}")
    b, s, hq, hkv, d = 2, 70, 4, 2, 64
    q, k, v = _inputs(jnp.bfloat16, b=b, sq=s, skv=s, hq=hq, hkv=hkv, d=d, seed=5)
    ids = np.repeat(np.arange(4), 20)[:s].astype(np.int32)
    q_ids = np.stack([ids, np.where(np.arange(s) >= 60, -1, ids)]).astype(np.int32)
    kv_ids = np.stack([ids, np.where(np.arange(s) % 7 == 3, -1, ids)]).astype(np.int32)
    bias = jnp.asarray(np.random.default_rng(6).standard_normal((1, hq, s, s), dtype=np.float32))
    visible = (q_ids[:, :, None] == kv_ids[:, None, :]) & (q_ids[:, :, None] >= 0) & (kv_ids[:, None, :] >= 0)
    scale = d ** -0.5
    config = KernelConfig(cpu_isa=level, tiles=TileConfig(tile_q=8, tile_kv=32))
    mask = masks.Segments(jnp.asarray(q_ids), jnp.asarray(kv_ids))
    d_out = jnp.asarray(np.random.default_rng(7).standard_normal(q.shape, dtype=np.float32))

    def ours(q, k, v):
        out = flash_attention(q, k, v, mask=mask, bias=bias, backend="cpu", config=config)
        return jnp.sum(out.astype(jnp.float32) * d_out), out

    def expected(q, k, v):
        out = _masked_attention(q, k, v, jnp.asarray(visible), bias, scale)
        return jnp.sum(out * d_out), out

    (_, out), grads = jax.value_and_grad(ours, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    (_, want), want_grads = jax.value_and_grad(expected, argnums=(0, 1, 2), has_aux=True)(
        *(x.astype(jnp.float32) for x in (q, k, v)))
    _close(out, want, TOLERANCE["bfloat16"])
    assert not np.any(np.asarray(out[1, 60:], np.float32)), "padding queries must give zeros"
    for got, exp in zip(grads, want_grads):
        _close(got, exp, GRAD_TOLERANCE["bfloat16"])
