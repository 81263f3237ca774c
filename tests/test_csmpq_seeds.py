"""CSMPQ evidence: the full-budget random sampler, the value-table integer
program, the Hessian-trace baseline, the paired statistics and the seed loop
of the CLI (the loop with a stand-in for the per-seed experiment, so that it
runs in seconds; tests/test_csmpq_quant.py runs the real one end to end)."""
import itertools
import json
import math

import numpy as np
import pytest
from flax import nnx

from models.layers import layer_costs
from models.quant import csmpq, hessian, pipeline, seeds, stats
from models.quant.allocation import allocate_bits, allocate_bits_table, model_size_mb
from models.resnet import ResNet18


@pytest.fixture(scope="module")
def tiny():
    model = ResNet18(10, 1, width=0.125, rngs=nnx.Rngs(0))
    model.eval()
    params, _ = layer_costs(model.quantizable_layers(), (12, 12))
    return model, params


@pytest.mark.parametrize("mode,uniform", [("qat", 5), ("ptq", 3)])
def test_full_budget_random_draws_spend_the_budget(tiny, mode, uniform):
    _, params = tiny
    spec = pipeline.mode_spec(mode, np.linspace(0.1, 1.0, len(params)))
    budget = model_size_mb(params, [spec.fixed_bits.get(l, uniform) for l in range(len(params))])
    rng = np.random.default_rng(0)
    draws = [pipeline.random_bits_full_budget(params, budget, spec, rng) for _ in range(30)]
    choices = sorted(spec.bit_choices)
    for bits in draws:
        size = model_size_mb(params, bits)
        assert 0.98 * budget - 1e-12 <= size <= budget + 1e-12
        assert all(b in choices for b in bits) and all(bits[l] == b for l, b in spec.fixed_bits.items())
        # maximal: no free layer can take its next width within the budget
        for l in range(len(params)):
            if l in spec.fixed_bits or bits[l] == choices[-1]:
                continue
            raised = list(bits)
            raised[l] = choices[choices.index(bits[l]) + 1]
            assert model_size_mb(params, raised) > budget
    assert len(set(draws)) > 20  # still random
    # the plain sampler leaves budget unspent on some draws; the repair does not
    plain = [pipeline.random_bits(params, budget, spec, np.random.default_rng(s)) for s in range(30)]
    assert min(model_size_mb(params, b) for b in plain) < min(model_size_mb(params, b) for b in draws)
    with pytest.raises(ValueError, match="min_fill"):
        pipeline.random_bits_full_budget(params, budget, spec, rng, min_fill=1.5)


def test_fill_budget_refuses_nothing_when_full(tiny):
    _, params = tiny
    spec = pipeline.mode_spec("ptq", np.ones(len(params)))
    top = tuple([4] * len(params))
    assert pipeline.fill_budget(top, params, model_size_mb(params, top), spec, np.random.default_rng(0)) == top


def test_value_table_program_is_optimal_against_brute_force():
    rng = np.random.default_rng(3)
    params = rng.integers(10_000, 300_000, 5)
    choices = (2, 3, 4)
    values = -rng.random((5, 3)) * np.array([4.0, 2.0, 1.0])  # fewer bits, larger loss
    budget = model_size_mb(params, [4, 3, 3, 3, 3])
    ours = allocate_bits_table(values, params, budget, choices, {0: 4})
    feasible = [b for b in itertools.product(choices, repeat=5)
                if b[0] == 4 and model_size_mb(params, b) <= budget + 1e-12]
    best = max(feasible, key=lambda b: sum(values[l, choices.index(b[l])] for l in range(1, 5)))
    assert ours.size_mb <= budget + 1e-9 and ours.bits[0] == 4
    assert ours.objective == pytest.approx(sum(values[l, choices.index(best[l])] for l in range(1, 5)), rel=1e-9)
    # CSMPQ's program is the special case values = theta * bits / 8
    theta = rng.random(5)
    direct = allocate_bits(theta, params, budget, choices, theta=theta)
    table = allocate_bits_table(theta[:, None] * np.array(choices)[None] / 8, params, budget, choices)
    assert direct.bits == table.bits
    with pytest.raises(ValueError, match="values must be"):
        allocate_bits_table(values[:, :2], params, budget, choices)


def test_hutchinson_trace_matches_the_exact_trace(tiny):
    """Per-layer Hutchinson estimates against the exact trace of each
    small layer's own Hessian block (jax.hessian on that kernel alone)."""
    import jax
    import jax.numpy as jnp

    model, params = tiny
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 12, 12, 1)).astype(np.float32)
    y = rng.integers(0, 10, 8).astype(np.int32)
    last = len(params) - 1
    estimate = dict(zip((0, last), hessian.hutchinson_traces(model, x, y, samples=60, seed=1, layers=(0, last))))
    loss = hessian.loss_of_kernels(model)
    weights = hessian.kernels(model)
    for l in (0, last):  # stem (72 weights) and head (640)
        def block(w, l=l):
            return loss([w if i == l else k for i, k in enumerate(weights)], jnp.asarray(x), jnp.asarray(y))
        h = jax.hessian(block)(weights[l]).reshape(weights[l].size, weights[l].size)
        exact = float(jnp.trace(h))
        assert estimate[l] == pytest.approx(exact, rel=0.3), (l, estimate[l], exact)
    with pytest.raises(ValueError, match="names layer"):
        hessian.hutchinson_traces(model, x, y, samples=1, layers=(len(params),))


def test_hessian_sensitivity_orders_widths(tiny):
    model, params = tiny
    perturbation = hessian.perturbations(model, (2, 3, 4))
    assert np.all(np.diff(perturbation, axis=1) < 0)  # more bits, smaller perturbation
    traces = np.linspace(-1.0, 5.0, len(params))
    values = hessian.sensitivity_values(traces, params, perturbation)
    assert np.all(values[0] == 0)  # negative trace counts as insensitive
    np.testing.assert_allclose(values[-1], -traces[-1] / params[-1] * perturbation[-1])


def test_paired_statistics_against_hand_computation():
    a = np.array([0.95, 0.94, 0.96, 0.93, 0.95])
    b = np.array([0.93, 0.93, 0.93, 0.92, 0.94])
    d = a - b
    result = stats.paired(a, b)
    sem = d.std(ddof=1) / math.sqrt(5)
    t = d.mean() / sem
    from scipy.stats import t as student
    assert result["mean_difference"] == pytest.approx(d.mean())
    assert result["t_test_p"] == pytest.approx(2 * student.sf(abs(t), 4), rel=1e-6)
    assert result["ci_high"] - result["mean_difference"] == pytest.approx(student.ppf(0.975, 4) * sem, rel=1e-6)
    # five wins out of five: the exact signed-rank p is 2 / 2^5
    assert result["wilcoxon_p"] == pytest.approx(2 / 32)
    assert (result["wins"], result["ties"], result["losses"]) == (5, 0, 0)
    assert stats.summary([1.0, 3.0]) == dict(mean=2.0, std=pytest.approx(math.sqrt(2)), n=2)
    with pytest.raises(ValueError, match="at least 2 seeds"):
        stats.paired([1.0], [2.0])


def _fake_report(seed, accuracies, budget=1.0):
    results = [dict(method=m, bits=[4], size_mb=0.99 * budget, bops=1e9, accuracy=a) for m, a in accuracies]
    return dict(model="resnet18", mode="ptq", width=0.125, data="d", seed=seed, budget_mb=budget,
                budget_fraction_of_8bit=0.4, fp_accuracy=0.9, score_seconds=0.5, score_seconds_warm=0.01,
                solve_seconds=0.002, settings={}, results=results)


def test_seed_loop_threads_seeds_and_aggregates(tmp_path, monkeypatch):
    calls = []

    def fake_run_seed(args, seed):
        calls.append(seed)
        rng = np.random.default_rng(seed)
        return _fake_report(seed, [("csmpq", 0.9 + 0.01 * seed), ("uniform", 0.88), ("random0", rng.random()),
                                   ("random1", rng.random())])

    monkeypatch.setattr(csmpq, "run_seed", fake_run_seed)
    summary = csmpq.main(["--model", "resnet18", "--mode", "ptq", "--baselines", "2", "--seeds", "3", "--seed", "4",
                          "--out", str(tmp_path)])
    assert calls == [4, 5, 6]
    stored = json.loads((tmp_path / "resnet18_ptq_seeds.json").read_text())
    assert stored["seeds"] == [4, 5, 6] and len(stored["per_seed_reports"]) == 3
    expected_random = [np.mean(np.random.default_rng(s).random(2)) for s in (4, 5, 6)]
    np.testing.assert_allclose(stored["methods"]["random"]["per_seed"], expected_random)
    assert stored["methods"]["csmpq"]["accuracy"]["mean"] == pytest.approx(0.95)
    assert stored["comparisons"]["csmpq-uniform"]["wins"] == 3
    assert stored["methods"]["uniform"]["budget_used"] == pytest.approx(0.99)
    assert (tmp_path / "resnet18_ptq_seeds.png").stat().st_size > 0
    assert "| csmpq |" in seeds.table(summary) and "| uniform |" in seeds.comparison_table(summary)
    with pytest.raises(ValueError, match="mix settings"):
        seeds.aggregate([_fake_report(0, [("csmpq", 0.9)]), _fake_report(1, [("csmpq", 0.9)], budget=2.0)])


def test_cli_rejects_bad_budget_arguments():
    for argv in (["--size-mb", "0.2", "--budget-fraction", "0.5"], ["--budget-fraction", "1.5"],
                 ["--model", "resnet18", "--mode", "ptq", "--paper-budget"], ["--seeds", "1"],
                 ["--random-fill", "2"]):
        with pytest.raises(SystemExit):
            csmpq.parse_args(argv)
    assert csmpq.parse_args(["--model", "mobilenet_v2", "--mode", "ptq", "--paper-budget"]).paper_budget


def test_aggregate_merges_parallel_runs(tmp_path):
    first = tmp_path / "a.json"
    first.write_text(json.dumps(_fake_report(2, [("csmpq", 0.91), ("uniform", 0.90)])))
    second = tmp_path / "b.json"  # a --seeds file holding two seeds
    second.write_text(json.dumps(dict(per_seed_reports=[_fake_report(s, [("csmpq", 0.93), ("uniform", 0.90)])
                                                        for s in (0, 1)])))
    summary = csmpq.main(["--aggregate", str(first), str(second), "--out", str(tmp_path / "merged")])
    assert summary["seeds"] == [0, 1, 2]
    assert summary["methods"]["csmpq"]["per_seed"] == [0.93, 0.93, 0.91]
    assert (tmp_path / "merged" / "resnet18_ptq_seeds.json").exists()
    with pytest.raises(ValueError, match="repeat a seed"):
        csmpq.main(["--aggregate", str(first), str(first), "--out", str(tmp_path / "again")])
