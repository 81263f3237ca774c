"""Tile classification (tiling-mask) against brute force on the full mask."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_fastattn import masks


def brute_force_classes(plan, tile_q, tile_kv):
    full = np.asarray(masks.materialize(plan))  # [B|1, H|1, Sq, Skv]
    nq, nk = -(-plan.q_len // tile_q), -(-plan.kv_len // tile_kv)
    out = np.zeros(full.shape[:2] + (nq, nk), np.int8)
    for i, j in itertools.product(range(nq), range(nk)):
        tile = full[:, :, i * tile_q:(i + 1) * tile_q, j * tile_kv:(j + 1) * tile_kv]
        out[:, :, i, j] = np.where(tile.all(axis=(2, 3)), masks.FULL,
                                   np.where(tile.any(axis=(2, 3)), masks.PARTIAL, masks.EMPTY))
    return out


def random_plan(rng, batch=2, heads=3):
    q_len, kv_len = int(rng.integers(1, 70)), int(rng.integers(1, 70))
    parts = []
    if rng.random() < 0.5:
        parts.append(masks.Causal(align=str(rng.choice(["bottom_right", "top_left"]))))
    if rng.random() < 0.4:
        left = None if rng.random() < 0.3 else int(rng.integers(0, 20))
        right = None if rng.random() < 0.3 else int(rng.integers(0, 20))
        parts.append(masks.SlidingWindow(left, right, align=str(rng.choice(["bottom_right", "top_left"]))))
    if rng.random() < 0.5:
        q_ids = np.sort(rng.integers(-1, 3, (batch, q_len)), axis=1)
        kv_ids = np.sort(rng.integers(-1, 3, (batch, kv_len)), axis=1)
        parts.append(masks.Segments(jnp.asarray(q_ids, jnp.int32), jnp.asarray(kv_ids, jnp.int32)))
    if rng.random() < 0.3:
        dense = rng.random((1, heads, q_len, kv_len)) < 0.95
        parts.append(masks.Dense(jnp.asarray(dense)))
    mask = None
    for part in parts:
        mask = part if mask is None else mask & part
    kinds = {type(p) for p in parts} - {masks.Causal, masks.SlidingWindow}
    single_kind = len(kinds) == 0 or (len(kinds) == 1 and not any(
        isinstance(p, (masks.Causal, masks.SlidingWindow)) for p in parts))
    return masks.make_plan(mask, False, batch, heads, q_len, kv_len), single_kind


@pytest.mark.parametrize("seed", range(40))
def test_classification_matches_brute_force(seed):
    """Exact for a band, segments or dense alone; for intersections, sound:
    EMPTY only if truly empty, FULL only if truly full (PARTIAL otherwise)."""
    rng = np.random.default_rng(seed)
    plan, single_kind = random_plan(rng)
    tile_q, tile_kv = int(rng.choice([1, 4, 8, 16])), int(rng.choice([1, 8, 32]))
    ours = np.broadcast_to(np.asarray(masks.classify_tiles(plan, tile_q, tile_kv)),
                           brute_force_classes(plan, tile_q, tile_kv).shape)
    expected = brute_force_classes(plan, tile_q, tile_kv)
    if single_kind:
        np.testing.assert_array_equal(ours, expected)
    else:
        assert np.all((ours == expected) | (ours == masks.PARTIAL))


def test_causal_skips_upper_triangle_and_never_materialises():
    plan = masks.make_plan(masks.Causal(), False, 1, 1, 4096, 4096)
    classes = np.asarray(masks.classify_tiles(plan, 64, 128))[0, 0]
    assert classes.shape == (64, 32)
    assert (classes == masks.EMPTY).sum() > 0.45 * classes.size
    assert plan.dense is None  # band masks stay a band


def test_bottom_right_vs_top_left_alignment():
    br = masks.make_plan(masks.Causal(), False, 1, 1, 2, 5)
    tl = masks.make_plan(masks.Causal(align="top_left"), False, 1, 1, 2, 5)
    np.testing.assert_array_equal(np.asarray(masks.materialize(br))[0, 0],
                                  [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(np.asarray(masks.materialize(tl))[0, 0],
                                  [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])


def test_sliding_window_matches_jax_local_window():
    """For Sq == Skv, SlidingWindow(l, r) is jax's local_window_size=(l, r)."""
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(x, (1, 20, 2, 8)) for x in keys)
    from jax_fastattn import flash_attention
    ours = flash_attention(q, k, v, mask=masks.SlidingWindow(3, 2), backend="reference")
    theirs = jax.nn.dot_product_attention(q, k, v, local_window_size=(3, 2), implementation="xla")
    np.testing.assert_allclose(ours, theirs, atol=2e-5)
    ours_causal = flash_attention(q, k, v, causal=True, backend="reference")
    np.testing.assert_allclose(ours_causal, jax.nn.dot_product_attention(q, k, v, is_causal=True), atol=2e-5)


def test_segments_classified_at_run_time_under_jit():
    @jax.jit
    def classes(q_ids, kv_ids):
        plan = masks.make_plan(masks.Segments(q_ids, kv_ids), False, 1, 1, 8, 8)
        return masks.classify_tiles(plan, 4, 4)

    out = classes(jnp.array([[0, 0, 0, 0, 1, 1, 1, 1]]), jnp.array([[0, 0, 0, 0, 1, 1, 1, 1]]))
    np.testing.assert_array_equal(np.asarray(out)[0, 0], [[2, 0], [0, 2]])
    out = classes(jnp.array([[0, 0, 0, 0, 0, 0, 0, 0]]), jnp.array([[0, 0, 0, 0, 1, 1, 1, 1]]))
    np.testing.assert_array_equal(np.asarray(out)[0, 0], [[2, 0], [2, 0]])
