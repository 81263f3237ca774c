"""CSMPQ's quantization side: qwix fake-quant rules, AdaRound, the baseline
allocations and the CLI end to end on tiny settings."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.data import mnist_sample
from models.layers import layer_costs
from models.quant import adaround as ada
from models.quant import fake_quant, pipeline
from models.quant.allocation import model_size_mb
from models.resnet import ResNet18


@pytest.fixture(scope="module")
def tiny():
    model = ResNet18(10, 1, width=0.125, rngs=nnx.Rngs(0))
    model.eval()
    x = np.random.default_rng(0).normal(size=(16, 12, 12, 1)).astype(np.float32)
    return model, x


def test_layer_paths_name_every_quantizable_op(tiny):
    model, _ = tiny
    paths = fake_quant.layer_paths(model)
    assert len(paths) == len(model.quantizable_layers()) == 21
    assert paths[0] == "stem/conv" and paths[-1] == "head" and "blocks/2/shortcut/conv" in paths


def test_fewer_bits_more_error_and_original_untouched(tiny):
    model, x = tiny
    reference = np.asarray(model(x))
    n = len(model.quantizable_layers())
    errors = []
    for bits in (8, 4, 2):
        quantized = fake_quant.fake_quantized(model, [bits] * n, 8, x)
        quantized(x)  # calibrate activation ranges
        fake_quant.freeze_activation_ranges(quantized)
        errors.append(float(np.max(np.abs(np.asarray(quantized(x)) - reference))))
    assert errors[0] < errors[1] < errors[2]
    np.testing.assert_array_equal(np.asarray(model(x)), reference)
    with pytest.raises(ValueError, match="bit-widths must be in"):
        fake_quant.fake_quantized(model, [9] * n, 8, x)
    with pytest.raises(ValueError, match="weight_bits has 3 entries"):
        fake_quant.fake_quantized(model, [4] * 3, 8, x)


def test_round_to_nearest_grid():
    kernel = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 4, 5)), jnp.float32)
    for bits in (2, 4, 8):
        rounded = ada.round_to_nearest(kernel, bits)
        scale = ada.channel_scale(kernel, bits)
        steps = np.asarray(rounded / scale)
        np.testing.assert_allclose(steps, np.round(steps), atol=1e-4)
        assert steps.min() >= -2 ** (bits - 1) - 1e-3 and steps.max() <= 2 ** (bits - 1) - 1 + 1e-3


def test_adaround_puts_weights_on_the_grid_and_beats_nearest(tiny):
    model, x = tiny
    bits = [3] * len(model.quantizable_layers())
    rounded = ada.adaround(model, bits, x, steps=200, batch_size=8)
    for layer, original in zip(rounded.quantizable_layers(), model.quantizable_layers()):
        w = (layer.conv.kernel if hasattr(layer, "conv") else layer.kernel).value
        w0 = (original.conv.kernel if hasattr(original, "conv") else original.kernel).value
        steps = np.asarray(w / ada.channel_scale(w0, 3))
        np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
        # each weight moved to one of its two neighbouring grid points
        assert np.all(np.abs(steps - np.asarray(w0 / ada.channel_scale(w0, 3))) <= 1 + 1e-3)
    nearest = nnx.clone(model)
    for layer in nearest.quantizable_layers():
        kernel = layer.conv.kernel if hasattr(layer, "conv") else layer.kernel
        kernel.value = ada.round_to_nearest(kernel.value, 3)

    def output_error(m):  # AdaRound's objective: relative error of every layer's output
        return float(np.mean([np.sum((np.asarray(o) - np.asarray(t)) ** 2) / np.sum(np.asarray(t) ** 2)
                              for o, t in zip(m(x, collect=True)[1], model(x, collect=True)[1])]))

    assert output_error(rounded) < output_error(nearest)


def test_baseline_allocations_meet_the_budget(tiny):
    model, _ = tiny
    params, _ = layer_costs(model.quantizable_layers(), (12, 12))
    scores = np.linspace(0.1, 1.0, len(params))
    for mode, uniform in (("qat", 5), ("ptq", 3)):
        spec = pipeline.mode_spec(mode, scores)
        budget = model_size_mb(params, [spec.fixed_bits.get(l, uniform) for l in range(len(params))])
        assert pipeline.uniform_bits(len(params), params, budget, spec) == \
            tuple(spec.fixed_bits.get(l, uniform) for l in range(len(params)))
        rng = np.random.default_rng(0)
        draws = [pipeline.random_bits(params, budget, spec, rng) for _ in range(20)]
        for bits in draws:
            assert model_size_mb(params, bits) <= budget + 1e-9
            assert all(b in spec.bit_choices for b in bits)
            assert all(bits[l] == b for l, b in spec.fixed_bits.items())
        assert len(set(draws)) > 1
    with pytest.raises(ValueError, match="mode must be"):
        pipeline.mode_spec("int8", scores)


def test_mnist_sample_split():
    data = mnist_sample()
    assert data.x_train.shape == (4000, 28, 28, 1) and data.x_test.shape == (1000, 28, 28, 1)
    assert np.all(np.bincount(data.y_test) == 100)


@pytest.mark.slow
def test_cli_end_to_end(tmp_path, capsys):
    from models.quant import csmpq

    report = csmpq.main(["--model", "resnet18", "--mode", "ptq", "--width", "0.125", "--fp-epochs", "1",
                         "--ptq-steps", "5", "--baselines", "1", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "integer program solved" in printed and "random mean accuracy" in printed
    stored = json.loads((tmp_path / "resnet18_ptq.json").read_text())
    assert [r["method"] for r in stored["results"]] == ["csmpq", "uniform", "random0"]
    assert (tmp_path / "resnet18_ptq.png").stat().st_size > 0
    for result in report["results"]:
        assert result["size_mb"] <= report["budget_mb"] + 1e-9 and 0.0 <= result["accuracy"] <= 1.0
    assert report["score_seconds"] < 10 and report["solve_seconds"] < 1
