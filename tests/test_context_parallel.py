"""Context-parallel attention (ring and all-gather) on 8 host CPU devices,
against a plain-JAX attention written here from positions, forward and
gradients; the compiled ring has collective-permutes and no all-gather; the
zig-zag layout gives every device the same number of non-empty tiles."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from jax_fastattn import masks  # noqa: E402
from jax_fastattn.parallel import context_parallel_attention  # noqa: E402
from jax_fastattn.parallel import context, context_schedule  # noqa: E402

DEVICES = 8


@pytest.fixture(scope="module")
def mesh():
    if len(jax.devices()) < DEVICES:
        pytest.skip(f"needs {DEVICES} devices (XLA_FLAGS=--xla_force_host_platform_device_count={DEVICES})")
    return Mesh(np.array(jax.devices()[:DEVICES]), ("cp",))


# ----------------------------------------------------------------------------
# Plain reference: the visibility matrix straight from positions.


def visibility(seq_len, causal=False, window=None, ids=None):
    """bool [B|1, 1, S, S]: key j visible from query i."""
    i = np.arange(seq_len)[:, None]
    j = np.arange(seq_len)[None, :]
    seen = np.ones((seq_len, seq_len), bool)
    if causal:
        seen &= j <= i
    if window is not None:
        left, right = window
        seen &= (j >= i - left) & (j <= i + right)
    seen = jnp.asarray(seen)[None, None]
    if ids is not None:
        seen = seen & ((ids[:, :, None] == ids[:, None, :]) & (ids[:, :, None] >= 0))[:, None]
    return seen


def plain_attention(q, k, v, seen):
    """out [B, S, Hq, D], lse [B, Hq, S]; rows that see nothing: 0 and -inf."""
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") / np.sqrt(q.shape[-1])
    any_seen = jnp.any(seen, axis=-1, keepdims=True)
    row_max = jax.lax.stop_gradient(jnp.max(jnp.where(seen, logits, -jnp.inf), axis=-1, keepdims=True))
    row_max = jnp.where(any_seen, row_max, 0.0)
    weights = jnp.where(seen, jnp.exp(jnp.where(seen, logits - row_max, 0.0)), 0.0)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    safe_total = jnp.where(any_seen, total, 1.0)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights / safe_total, v, precision="highest")
    lse = jnp.where(any_seen, row_max + jnp.log(safe_total), -jnp.inf)[..., 0]
    return out, lse


def loss_and_grads(attend, q, k, v, d_out, d_lse):
    """out, lse and d(<out, d_out> + <finite lse, d_lse>)/d(q, k, v)."""
    def loss(q, k, v):
        out, lse = attend(q, k, v)
        finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
        return jnp.sum(out * d_out) + jnp.sum(finite_lse * d_lse), (out, lse)
    (_, (out, lse)), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
    return out, lse, grads


def inputs(seq_len, q_heads=4, kv_heads=2, head_dim=8, batch=2, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(keys[0], (batch, seq_len, q_heads, head_dim))
    k = jax.random.normal(keys[1], (batch, seq_len, kv_heads, head_dim))
    v = jax.random.normal(keys[2], (batch, seq_len, kv_heads, head_dim))
    d_out = jax.random.normal(keys[3], q.shape)
    d_lse = jax.random.normal(keys[4], (batch, q_heads, seq_len))
    return q, k, v, d_out, d_lse


def packed_ids(seq_len):
    """Two rows of packed documents, the second with trailing padding (-1)."""
    first = np.repeat([0, 1, 2], [seq_len // 3, seq_len // 3, seq_len - 2 * (seq_len // 3)])
    second = np.concatenate([np.repeat([0, 1], [3, seq_len - 9]), -np.ones(6, int)])
    return jnp.asarray(np.stack([first, second]), jnp.int32)


def assert_close(actual, expected, what, tolerance=2e-5):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert np.array_equal(np.isfinite(actual), np.isfinite(expected)), f"{what}: finite pattern differs"
    finite = np.isfinite(expected)
    scale = max(float(np.max(np.abs(expected[finite]))), 1e-6)
    error = float(np.max(np.abs(actual[finite] - expected[finite])))
    assert error <= tolerance * scale, f"{what}: max error {error:.3g} (scale {scale:.3g})"


def check_against_plain(mesh, seq_len, strategy, layout, causal=False, window=None, segmented=False,
                        shard_inputs=False):
    """Runs forward and gradients in one compiled function; returns its HLO text."""
    q, k, v, d_out, d_lse = inputs(seq_len)
    ids = packed_ids(seq_len) if segmented else None
    mask = None
    if window is not None:
        mask = masks.SlidingWindow(*window)
    if ids is not None:
        mask = masks.Segments(ids, ids) if mask is None else mask & masks.Segments(ids, ids)

    def parallel(q, k, v):
        return context_parallel_attention(q, k, v, mesh=mesh, axis="cp", causal=causal, mask=mask,
                                          strategy=strategy, layout=layout, return_lse=True, backend="cpu")

    if shard_inputs:
        sharding = NamedSharding(mesh, P(None, "cp"))
        q, k, v, d_out = (jax.device_put(x, sharding) for x in (q, k, v, d_out))
        d_lse = jax.device_put(d_lse, NamedSharding(mesh, P(None, None, "cp")))
    compiled = jax.jit(lambda *xs: loss_and_grads(parallel, *xs)).lower(q, k, v, d_out, d_lse).compile()
    out, lse, grads = compiled(q, k, v, d_out, d_lse)
    seen = visibility(seq_len, causal, window, ids)
    ref_out, ref_lse, ref_grads = loss_and_grads(lambda q, k, v: plain_attention(q, k, v, seen),
                                                 q, k, v, d_out, d_lse)
    assert_close(out, ref_out, "out")
    assert_close(lse, ref_lse, "lse")
    for name, got, want in zip(("d_q", "d_k", "d_v"), grads, ref_grads):
        assert_close(got, want, name, tolerance=1e-4)
    return compiled.as_text()


# ----------------------------------------------------------------------------
# Equality with the unsharded reference, forward and gradients.


def test_ring_zigzag_causal_gqa_sharded_has_no_kv_all_gather(mesh):
    hlo = check_against_plain(mesh, 32, "ring", "zigzag", causal=True, shard_inputs=True)
    assert "collective-permute" in hlo
    assert "all-gather" not in hlo, "ring mode must not gather K/V"


@pytest.mark.parametrize("strategy,layout,causal,window,segmented,seq_len", [
    ("ring", "zigzag", False, None, False, 32),           # no mask
    ("ring", "zigzag", True, None, True, 29),             # causal & segments (with padding ids), odd length
    ("ring", "contiguous", False, (5, 2), False, 37),     # sliding window both sides, odd length
    ("all_gather", "zigzag", True, (6, 0), False, 27),    # causal window, odd length
    ("all_gather", "contiguous", False, None, True, 24),  # segments only
])
def test_matches_plain_attention(mesh, strategy, layout, causal, window, segmented, seq_len):
    hlo = check_against_plain(mesh, seq_len, strategy, layout, causal, window, segmented)
    if strategy == "all_gather":
        assert "all-gather" in hlo


def test_zigzag_input_order_matches_natural(mesh):
    q, k, v, _, _ = inputs(32)

    def both_orders(q, k, v):
        run = lambda order, *xs: context_parallel_attention(  # noqa: E731
            *xs, mesh=mesh, axis="cp", causal=True, strategy="ring", input_order=order, backend="cpu")
        permuted = run("zigzag", *(context_schedule.to_zigzag(x, DEVICES) for x in (q, k, v)))
        return run("natural", q, k, v), context_schedule.from_zigzag(permuted, DEVICES)

    natural, permuted = jax.jit(both_orders)(q, k, v)
    assert_close(permuted, natural, "out")
    ref_out, _ = plain_attention(q, k, v, visibility(32, causal=True))
    assert_close(natural, ref_out, "out")


# ----------------------------------------------------------------------------
# Load balance and the static schedule.


def zigzag_chunks(rank, n):
    return [rank, 2 * n - 1 - rank]


def count_tiles_by_position(chunk_lists, chunk_len, tile, seq_len):
    """Per device: (q tile, k tile) pairs with any causally visible pair,
    from token positions alone."""
    counts = []
    for chunks in chunk_lists:
        total = 0
        for chunk in chunks:
            for q0 in range(chunk * chunk_len, (chunk + 1) * chunk_len, tile):
                for k0 in range(0, seq_len, tile):
                    total += k0 <= q0 + tile - 1   # some key k0.. <= some query ..q0+tile-1
        counts.append(total)
    return counts


def count_tiles_by_schedule(sched, tile):
    """Per device: non-empty tiles of the pairs the ring schedule runs, each
    under its block band."""
    counts = []
    c = sched.chunk_len
    ii = np.arange(c)[:, None]
    jj = np.arange(c)[None, :]
    for table in sched.branch_array():
        total = 0
        for index in table.reshape(-1):
            band = sched.bands[index]
            if band is None:
                continue
            lo, hi = band
            seen = np.ones((c, c), bool)
            if lo is not None:
                seen &= jj - ii >= lo
            if hi is not None:
                seen &= jj - ii <= hi
            total += int(seen.reshape(c // tile, tile, c // tile, tile).any(axis=(1, 3)).sum())
        counts.append(total)
    return counts


def test_zigzag_gives_every_device_the_same_number_of_nonempty_tiles():
    n, chunk_len, tile = DEVICES, 16, 4
    seq_len = 2 * n * chunk_len
    assert np.array_equal(context_schedule.chunk_positions("zigzag", n), [zigzag_chunks(r, n) for r in range(n)])
    by_position = count_tiles_by_position([zigzag_chunks(r, n) for r in range(n)], chunk_len, tile, seq_len)
    assert len(set(by_position)) == 1, by_position
    sched = context_schedule.build_ring_schedule("zigzag", n, chunk_len, None, 0)
    assert count_tiles_by_schedule(sched, tile) == by_position
    # The contiguous layout is the unbalanced naive ring: the last device does ~2x the mean.
    contiguous = count_tiles_by_position([[r] for r in range(n)], 2 * chunk_len, tile, seq_len)
    assert max(contiguous) > 1.8 * np.mean(contiguous)
    naive = context_schedule.build_ring_schedule("contiguous", n, 2 * chunk_len, None, 0)
    assert count_tiles_by_schedule(naive, tile) == contiguous


def test_schedule_skips_empty_steps():
    n = DEVICES
    assert context_schedule.build_ring_schedule("zigzag", n, 8, None, 0).steps == tuple(range(n))
    # A window shorter than a chunk: contiguous needs the previous device only,
    # zig-zag the next one too (its second chunk's left neighbour lives there).
    assert context_schedule.build_ring_schedule("contiguous", n, 8, -5, 0).steps == (0, 1)
    assert context_schedule.build_ring_schedule("zigzag", n, 8, -5, 0).steps == (0, 1, n - 1)
    # Non-causal: every step, every pair full.
    full = context_schedule.build_ring_schedule("zigzag", n, 8, None, None)
    assert full.steps == tuple(range(n)) and full.bands == (None, (None, None))


def test_block_band():
    # A block wholly before its queries under causal is full; wholly after, empty; same start, diagonal.
    assert context_schedule.block_band(None, 0, -8, 8, 8) == (None, None)
    assert context_schedule.block_band(None, 0, 8, 8, 8) is None
    assert context_schedule.block_band(None, 0, 0, 8, 8) == (None, 0)
    # Window of 5 to the left, previous chunk: key jj visible from ii iff jj - ii >= 3.
    assert context_schedule.block_band(-5, 0, -8, 8, 8) == (3, None)


def test_layout_order_round_trip():
    x = jnp.arange(2 * 32).reshape(2, 32)
    z = context_schedule.to_zigzag(x, 4)
    assert np.array_equal(z[0, :4], [0, 1, 2, 3]) and np.array_equal(z[0, 4:8], [28, 29, 30, 31])
    assert np.array_equal(context_schedule.from_zigzag(z, 4), x)


# ----------------------------------------------------------------------------
# Cost rule and argument errors.


def test_choose_strategy():
    assert context.choose_strategy(1024, 32, 32, 8) == "all_gather"
    assert context.choose_strategy(1 << 20, 32, 32, 8) == "ring"
    # GQA makes K/V cheaper to move: the ring pays off at shorter sequences.
    assert context.choose_strategy(8192, 32, 32, 8) == "all_gather"
    assert context.choose_strategy(8192, 32, 8, 8) == "ring"
    assert context.choose_strategy(1 << 20, 32, 32, 1) == "all_gather"


@pytest.mark.parametrize("kwargs,match", [
    (dict(strategy="tree"), "strategy must be one of"),
    (dict(layout="striped"), "layout must be one of"),
    (dict(axis="model"), "axis must be one of the mesh axes"),
    (dict(input_order="zigzag", layout="contiguous"), "input_order='zigzag' needs layout='zigzag'"),
    (dict(mask=masks.Dense(jnp.ones((1, 1, 30, 30), bool))), "not Dense"),
])
def test_bad_arguments(mesh, kwargs, match):
    q, k, v, _, _ = inputs(30)
    call = dict(mesh=mesh, axis="cp", backend="cpu")
    call.update(kwargs)
    with pytest.raises(ValueError, match=match):
        context_parallel_attention(q, k, v, **call)


def test_zigzag_input_order_needs_divisible_length(mesh):
    q, k, v, _, _ = inputs(30)
    with pytest.raises(ValueError, match="multiple of 16"):
        context_parallel_attention(q, k, v, mesh=mesh, axis="cp", input_order="zigzag", backend="cpu")


def test_batch_axis_splits_the_batch_on_a_second_mesh_axis():
    if len(jax.devices()) < DEVICES:
        pytest.skip(f"needs {DEVICES} devices")
    mesh_2d = Mesh(np.array(jax.devices()[:DEVICES]).reshape(2, DEVICES // 2), ("data", "cp"))
    q, k, v, _, _ = inputs(20)
    attend = jax.jit(lambda q, k, v: context_parallel_attention(
        q, k, v, mesh=mesh_2d, axis="cp", batch_axis="data", causal=True, strategy="ring", backend="cpu"))
    assert_close(attend(q, k, v), plain_attention(q, k, v, visibility(20, causal=True))[0], "out")


def test_speedup_model_reproduces_the_analytic_limits():
    """With equal kernel throughput on every block (diag = full / 2), free
    merges and an infinitely fast link, the model's zig-zag ring is linear and
    its naive ring reaches N / (2N - 1) (53 % at N = 8, the published 52-54 %)."""
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "..", "tools", "gpu", "ring_step_time.py")
    spec = importlib.util.spec_from_file_location("ring_step_time", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    cfg = dict(heads=32, kv_heads=32, head_dim=128, dtype="bfloat16")
    block = {"full": {"fwd_s": 1.0, "fwd_bwd_s": 3.5}, "diag": {"fwd_s": 0.5, "fwd_bwd_s": 1.75}, "merge_s": 0.0}
    for n in (2, 4, 8):
        measured = {"blocks": {"1024": block}, "single_device": {}}
        row = tool.model_case(measured, cfg, n, 2 * n * 1024, link_gbps=1e12)
        assert row["t1_source"] == "composed from blocks"
        assert abs(row["eff_zigzag_fwd"] - 1.0) < 1e-9
        assert abs(row["eff_naive_fwd"] - n / (2 * n - 1)) < 1e-9
        assert abs(row["eff_zigzag_fwd_bwd"] - 1.0) < 1e-9              # block backward from merged out/lse
        assert abs(row["eff_zigzag_fwd_bwd_rerun"] - 3.5 / 4.5) < 1e-9  # had each pair's forward re-run


def test_ring_bfloat16_forward(mesh):
    """bf16 inputs: block results merged in f32, within bf16 tolerance of the f32 reference."""
    q, k, v, _, _ = inputs(48)
    attend = jax.jit(lambda q, k, v: context_parallel_attention(
        q, k, v, mesh=mesh, axis="cp", causal=True, strategy="ring", backend="cpu"))
    out = attend(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
    assert out.dtype == jnp.bfloat16
    rounded = [x.astype(jnp.bfloat16).astype(jnp.float32) for x in (q, k, v)]
    assert_close(out.astype(jnp.float32), plain_attention(*rounded, visibility(48, causal=True))[0], "out",
                 tolerance=2e-2)


def test_ring_merges_held_parts_past_the_byte_limit(mesh, monkeypatch):
    """With PENDING_MERGE_BYTES below one part, every step's parts are merged
    into a float32 part at once (the path long sequences take); the result
    still equals the reference, forward and gradients."""
    from jax_fastattn.parallel import context
    monkeypatch.setattr(context, "PENDING_MERGE_BYTES", 1)
    hlo = check_against_plain(mesh, 40, "ring", "zigzag", causal=True, segmented=True)
    assert "collective-permute" in hlo


@pytest.mark.gpu
def test_gpu_ring_schedule_overlaps_every_transfer(tmp_path):
    """4 and 8 H100s compiled without them (deviceless, jax's CUDA plugin):
    tools/gpu/ring_schedule.py --check asserts that every K/V transfer of the
    forward, and every transfer of the backward but the final dK/dV one,
    has an attention kernel or GEMM scheduled between its start and done."""
    import subprocess
    import sys
    root = os.path.join(os.path.dirname(__file__), "..")
    result = subprocess.run([sys.executable, os.path.join(root, "tools", "gpu", "ring_schedule.py"), "--check",
                             "--out", str(tmp_path / "ring_schedule.json")], capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
