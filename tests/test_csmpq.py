"""CSMPQ: the TF-IDF score on a hand-computed case, and the bit allocation."""
import itertools
import math
import time

import numpy as np
import pytest

from models.quant import (allocate_bits, allocate_bits_relaxed, bops, layer_score, model_scores, model_size_mb,
                          pooled_features)


def test_score_matches_hand_computation():
    # 2 channels, 4 images.
    F = np.array([[4.0, 0.0, 0.0, 0.0],    # fires in one image: discriminative
                  [1.0, 1.0, 1.0, 2.0]])   # fires everywhere
    # means: c0 = 1 -> present only in image 0; c1 = 1.25 -> present in image 3.
    # column totals: 5, 1, 1, 2 -> tf c0 = [0.8, 0, 0, 0], c1 = [0.2, 1, 1, 1]
    # doc counts: 1, 1 -> idf = ln(4 / 2) for both
    # S c0 = 0.8 / 1, S c1 = tf[1, 3] * 1 / 1 = 1.0
    expected = (0.8 * math.log(2) + 1.0 * math.log(2)) / 2
    assert float(layer_score(F)) == pytest.approx(expected, rel=1e-6)


def test_score_zero_image_and_pooling():
    F = np.array([[0.0, 3.0, 1.0], [0.0, 1.0, 1.0]])  # image 0 all zero: tf 0, no NaN
    assert np.isfinite(float(layer_score(F)))
    act = np.random.default_rng(0).normal(size=(5, 4, 4, 3))
    pooled = np.asarray(pooled_features(act))
    assert pooled.shape == (3, 5)
    np.testing.assert_allclose(pooled, np.maximum(act, 0).mean(axis=(1, 2)).T, rtol=1e-6)


def test_milp_is_optimal_against_brute_force():
    rng = np.random.default_rng(1)
    scores = rng.random(5)
    params = rng.integers(10_000, 500_000, 5)
    choices = (4, 6, 8)
    budget = model_size_mb(params, [6] * 5)
    ours = allocate_bits(scores, params, budget, choices)
    best = max((b for b in itertools.product(choices, repeat=5) if model_size_mb(params, b) <= budget + 1e-12),
               key=lambda b: float(np.dot(scores, np.asarray(b) / 8)))
    assert ours.size_mb <= budget + 1e-9
    assert ours.objective == pytest.approx(float(np.dot(scores, np.asarray(best) / 8)), rel=1e-9)


def test_fixed_layers_relaxation_and_budget_errors():
    scores = np.array([0.1, 0.9, 0.2, 0.8, 0.5])
    params = np.array([1000, 200_000, 200_000, 200_000, 5000])
    fixed = {0: 8, 4: 8}
    budget = model_size_mb(params, [8, 6, 6, 6, 8])
    exact = allocate_bits(scores, params, budget, fixed_bits=fixed)
    relaxed = allocate_bits_relaxed(scores, params, budget, fixed_bits=fixed)
    for a in (exact, relaxed):
        assert a.bits[0] == 8 and a.bits[4] == 8 and a.size_mb <= budget + 1e-9
    assert exact.objective >= relaxed.objective - 1e-12
    assert exact.bits[1] >= exact.bits[2]  # more separable layer, more bits
    with pytest.raises(ValueError, match="infeasible"):
        allocate_bits(scores, params, 0.01, fixed_bits=fixed)
    ptq = allocate_bits(scores, params, model_size_mb(params, [3] * 5), bit_choices=(2, 3, 4),
                        theta=np.exp(-1.0 * scores))
    assert set(ptq.bits) <= {2, 3, 4}


def test_allocation_is_fast_and_bops():
    rng = np.random.default_rng(2)
    scores, params = rng.random(60), rng.integers(1000, 2_000_000, 60)
    start = time.perf_counter()
    allocate_bits(scores, params, model_size_mb(params, [6] * 60))
    assert time.perf_counter() - start < 1.0
    assert bops([10.0, 20.0], [4, 8], [8, 8]) == 10 * 4 * 8 + 20 * 8 * 8


def test_resnet18_scores_all_layers_fast():
    """Scoring every quantizable layer of ResNet-18 with 32 images < 10 s
    on the CPU (compilation included)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from models.resnet import ResNet18, layer_costs

    model = ResNet18(num_classes=10, rngs=nnx.Rngs(0))
    images = jax.random.normal(jax.random.PRNGKey(0), (32, 32, 32, 3))
    start = time.perf_counter()
    values = np.asarray(model_scores(model, images))
    elapsed = time.perf_counter() - start
    params, flops = layer_costs(model, (32, 32))
    assert len(values) == len(model.quantizable_layers()) == len(params) == 21
    assert np.all(np.isfinite(values))
    assert elapsed < 10.0, elapsed
    assert params[0] == 3 * 3 * 3 * 64 and params[-1] == 512 * 10
    _, outputs = nnx.jit(lambda m, x: m(x, collect=True))(model, images[:2])
    assert all(o.shape[1] * o.shape[2] * 2 * p == f for o, p, f in zip(outputs[:-1], params[:-1], flops[:-1]))


def test_mobilenet_v2_layers_and_costs():
    import jax
    from flax import nnx
    from models.mobilenet_v2 import MobileNetV2, layer_costs

    model = MobileNetV2(num_classes=10, rngs=nnx.Rngs(0))
    images = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
    logits, outputs = nnx.jit(lambda m, x: m(x, collect=True))(model, images)
    layers = model.quantizable_layers()
    assert logits.shape == (4, 10)
    assert len(outputs) == len(layers) == 53  # stem, 17 blocks (2 + 16 * 3 convs), last conv, head
    params, flops = layer_costs(model, (32, 32))
    assert params[0] == 3 * 3 * 3 * 32 and params[1] == 3 * 3 * 1 * 32  # stem; first depthwise
    # FLOPs follow the spatial size: a 1x1 conv's FLOPs = 2 * params * H * W of its output.
    assert all(o.shape[1] * o.shape[2] * 2 * p == f for o, p, f in zip(outputs[:-1], params[:-1], flops[:-1]))
    assert 2.0e6 < sum(params) < 2.4e6  # MobileNetV2 1.0 has ~2.2M weights (+ head)
