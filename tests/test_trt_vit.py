"""TRT-ViT (models/trt_vit): blocks against numpy references, shapes and
parameter counts of every variant against an independent count and the
published baseline counts, a forward/backward step, a falling loss, the
ONNX round trip, matched FLOPs of the guideline experiments, and the
bench's summaries."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.trt_vit import bench
from models.trt_vit.backbone import VARIANTS, Backbone, BackboneConfig, StageSpec, tiny_config
from models.trt_vit.baselines import PVT_SMALL, RESNETS, ViT
from models.trt_vit.blocks import MixedBlock, SpatialReductionAttention, TransformerBlock
from models.trt_vit.experiments import FLOPS_TOLERANCE, guideline_experiments
from models.trt_vit.measure import count_params, xla_flops


# ---------------------------------------------------------------- references

def _np(p):
    return np.asarray(p[...], np.float64)


def _layer_norm(x, norm, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * _np(norm.scale) + _np(norm.bias)


def _sra_numpy(layer: SpatialReductionAttention, x_map: np.ndarray) -> np.ndarray:
    """PVT's spatial-reduction attention written out in numpy from the
    layer's weights: patches of sr x sr -> linear (the strided conv) -> LN."""
    b, h, w, c = x_map.shape
    heads, sr = layer.heads, layer.sr_ratio
    tokens = x_map.reshape(b, h * w, c)
    q = tokens @ _np(layer.query.kernel) + _np(layer.query.bias)
    source = tokens
    if sr > 1:
        patches = x_map.reshape(b, h // sr, sr, w // sr, sr, c).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(b, (h // sr) * (w // sr), sr * sr * c)
        source = patches @ _np(layer.reduce.kernel).reshape(sr * sr * c, c) + _np(layer.reduce.bias)
        source = _layer_norm(source, layer.reduce_norm, layer.reduce_norm.epsilon)
    kv = source @ _np(layer.key_value.kernel) + _np(layer.key_value.bias)
    k, v = kv[..., :c], kv[..., c:]
    d = c // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(0, 2, 1, 3) for t in (q, k, v))
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = (weights @ v).transpose(0, 2, 1, 3).reshape(b, h * w, c)
    return out @ _np(layer.out.kernel) + _np(layer.out.bias)


# Independent parameter count from a config: conv+BN = k*k*cin*cout + 2*cout,
# linear = a*b + b, LayerNorm = 2*d.
def _conv_bn(cin, cout, k):
    return k * k * cin * cout + 2 * cout


def _linear(a, b):
    return a * b + b


def _bottleneck(cin, cout):
    mid = cout // 4
    proj = _conv_bn(cin, cout, 1) if cin != cout else 0
    return _conv_bn(cin, mid, 1) + _conv_bn(mid, mid, 3) + _conv_bn(mid, cout, 1) + proj


def _transformer(d, sr, mlp):
    hidden = int(d * mlp)
    reduce = sr * sr * d * d + d + 2 * d if sr > 1 else 0
    return 4 * d + 2 * _linear(d, d) + _linear(d, 2 * d) + reduce + _linear(d, hidden) + _linear(hidden, d)


def _expected_params(cfg: BackboneConfig) -> int:
    stem_kernel = {"resnet": 7, "patch4": 4, "small": 3}[cfg.stem]
    total, width = _conv_bn(cfg.in_channels, cfg.stem_channels, stem_kernel), cfg.stem_channels
    for s in cfg.stages:
        if s.kind != "bottleneck" and (s.stride != 1 or width != s.channels):
            total += _conv_bn(width, s.channels, s.stride)
            width = s.channels
        for _ in range(s.depth):
            if s.kind == "bottleneck":
                # the strided first block always projects (stride != 1 or width change)
                total += _bottleneck(width, s.channels) + (_conv_bn(width, s.channels, 1)
                                                           if width == s.channels and s.stride != 1 and _ == 0
                                                           else 0)
            elif s.kind == "transformer":
                total += _transformer(s.channels, s.sr_ratio, s.mlp_ratio)
            else:
                half = s.channels // 2
                total += _conv_bn(s.channels, half, 1) + _transformer(half, s.sr_ratio, s.mlp_ratio) \
                    + _bottleneck(half, half)
            width = s.channels
    if cfg.stages[-1].kind != "bottleneck":
        total += 2 * width
    return total + _linear(width, cfg.num_classes)


# ---------------------------------------------------------------- blocks

@pytest.mark.parametrize("sr_ratio", [1, 2])
@pytest.mark.parametrize("backend", ["auto", "xla"])
def test_attention_matches_numpy(sr_ratio, backend):
    layer = SpatialReductionAttention(32, 2, sr_ratio, backend, rngs=nnx.Rngs(1))
    x = np.random.default_rng(0).standard_normal((2, 6, 6, 32)).astype(np.float32)
    got = layer(jnp.asarray(x).reshape(2, 36, 32), (6, 6))
    np.testing.assert_allclose(np.asarray(got), _sra_numpy(layer, x.astype(np.float64)), rtol=2e-4, atol=2e-4)


def test_mixed_block_orders_share_parameters_and_differ():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 4, 4, 64)), jnp.float32)
    first = MixedBlock(64, 2, 1, order="global_local", rngs=nnx.Rngs(0))
    second = MixedBlock(64, 2, 1, order="local_global", rngs=nnx.Rngs(0))
    assert count_params(first) == count_params(second)
    a, b = first(x), second(x)
    assert a.shape == b.shape == x.shape
    assert not np.allclose(np.asarray(a), np.asarray(b))
    # global_local: the first half of the output is x + Transformer(reduce(x))
    expected = x[..., :32] + first.transformer(first.reduce(x))
    np.testing.assert_allclose(np.asarray(a[..., :32]), np.asarray(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make, match", [
    (lambda: MixedBlock(64, 1, order="local_global", transformer_ratio=0.25, rngs=nnx.Rngs(0)), "transformer_ratio"),
    (lambda: MixedBlock(64, 1, order="sideways", rngs=nnx.Rngs(0)), "order"),
    (lambda: TransformerBlock(30, 4, rngs=nnx.Rngs(0)), "heads"),
    (lambda: TransformerBlock(32, 2, attention_backend="tpu", rngs=nnx.Rngs(0)), "attention_backend"),
    (lambda: StageSpec("conv", 1, 64, 1), "kind"),
    (lambda: StageSpec("bottleneck", 0, 64, 1), "depth"),
    (lambda: BackboneConfig("x", (StageSpec("transformer", 1, 96, 1),)), "head_dim"),
    (lambda: tiny_config("E"), "variant"),
    (lambda: tiny_config("A", max_depth=0), "max_depth"),
])
def test_bad_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ---------------------------------------------------------------- variants

@functools.lru_cache(maxsize=None)
def _abstract(cfg: BackboneConfig):
    return nnx.eval_shape(lambda: Backbone(cfg, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_shapes_and_params(variant):
    cfg = VARIANTS[variant]
    model = _abstract(cfg)
    assert count_params(model) == _expected_params(cfg)
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    logits = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
    features = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).features(x), state, x)
    assert logits.shape == (2, 1000)
    assert features.shape == (2, 7, 7, cfg.stages[-1].channels)


def test_baseline_params_match_published_counts():
    # torchvision resnet50: 25,557,032; timm deit_small_patch16_224: 22,050,664
    assert count_params(_abstract(RESNETS["resnet50"])) == 25_557_032
    assert count_params(nnx.eval_shape(lambda: ViT(rngs=nnx.Rngs(0)))) == 22_050_664
    assert count_params(_abstract(PVT_SMALL)) == _expected_params(PVT_SMALL)


def test_tiny_forward_backward_step():
    """One training-mode forward/backward of a depth-1 copy of TRT-ViT-A:
    finite loss, finite gradients reaching (nearly) every parameter."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 28, 28, 1)), jnp.float32)
    y = jnp.asarray([0, 1, 2, 3])
    model = Backbone(tiny_config("A", width=0.0625, max_depth=1), rngs=nnx.Rngs(0))
    model.train()

    def loss_fn(m):
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(m(x)), y[:, None], axis=1))

    loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model)
    leaves = jax.tree.leaves(grads)
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
    assert sum(float(jnp.abs(g).sum()) > 0 for g in leaves) > 0.9 * len(leaves)


def test_transformer_block_gradients_match_plain_attention():
    """flash_attention (CPU kernel, its fused backward) and the einsum
    attention give the same block gradients."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 4, 32)), jnp.float32)

    def grads(backend):
        block = TransformerBlock(32, 2, 2, 2.0, backend, rngs=nnx.Rngs(3))
        return jax.tree.leaves(nnx.grad(lambda b: jnp.sum(jnp.sin(b(x))))(block))

    for g, g_plain in zip(grads("auto"), grads("plain")):
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_plain), rtol=1e-3, atol=1e-5)


def test_loss_falls_on_mnist_sample():
    from models.data import mnist_sample
    from models.trt_vit.train import train

    data = mnist_sample()
    model = Backbone(tiny_config("A", width=0.0625, max_depth=1), rngs=nnx.Rngs(0))
    losses = train(model, data.x_train, data.y_train, learning_rate=3e-3, batch_size=32, max_steps=40)
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3]), losses


def test_onnx_round_trip_tiny_variant():
    pytest.importorskip("jax2onnx", reason="jax2onnx (the ONNX exporter) is not installed")
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    from models.trt_vit.onnx_export import round_trip_error

    model = Backbone(tiny_config("A", width=0.0625, max_depth=1), rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).standard_normal((2, 28, 28, 1)).astype(np.float32)
    assert round_trip_error(model, x) < 1e-4


# ---------------------------------------------------------------- experiments

@functools.lru_cache(maxsize=None)
def _flops(cfg: BackboneConfig) -> float:
    return xla_flops(_abstract(cfg), (1, 224, 224, 3))


@pytest.mark.slow
def test_guideline_groups_have_matched_flops():
    for key, experiment in guideline_experiments().items():
        reference = _flops(dataclasses.replace(experiment.members[0], name=""))
        for member in experiment.members[1:]:
            ratio = _flops(dataclasses.replace(member, name="")) / reference
            assert abs(ratio - 1) <= FLOPS_TOLERANCE, (key, member.name, ratio)
        assert experiment.members[0].stages[2].kind != "mixed_local_first"


class _SevenBySevenAttention(nnx.Module):
    """One spatial-reduction attention layer over a 7x7 map of 64 channels."""

    def __init__(self):
        self.layer = SpatialReductionAttention(64, 1, 1, "auto", rngs=nnx.Rngs(0))

    def __call__(self, x):
        return self.layer(x.reshape(1, 49, 64), (7, 7))


def test_xla_flops_counts_attention():
    """The einsum attention's FLOPs are in the count: 4*S*Skv*D per head."""
    model = _SevenBySevenAttention()
    flops = xla_flops(model, (1, 7, 7, 64))
    linear = 2 * 49 * 64 * 64 * 4  # q, k, v and output projections
    assert flops >= linear + 4 * 49 * 49 * 64
    assert model.layer.attention_backend == "auto"  # restored


def test_xla_flops_lowered_for_the_host_cpu(monkeypatch):
    """FLOPs come from a module lowered for the host CPU even where the
    default device is another (the GPU client gives no lowered cost
    analysis): the lowering is asked for CPU-placed arguments."""
    model = _SevenBySevenAttention()
    expected = xla_flops(model, (1, 7, 7, 64))
    seen = []
    real_jit = jax.jit

    def spying_jit(fn, *a, **k):
        jitted = real_jit(fn, *a, **k)

        class Spy:
            def lower(self, *args):
                seen.extend(getattr(x, "sharding", None) for x in jax.tree.leaves(args))
                return jitted.lower(*args)
        return Spy()

    monkeypatch.setattr(jax, "jit", spying_jit)
    assert xla_flops(model, (1, 7, 7, 64)) == expected
    assert seen and all(s is not None and s.device_set == {jax.devices("cpu")[0]} for s in seen)


# ---------------------------------------------------------------- bench

def _row(name, group, dtype, ms, gflops):
    return {"name": name, "group": group, "dtype": dtype, "median_ms": ms, "gflops": gflops,
            "gflops_per_ms": gflops / ms}


def test_resnet50_check_picks_nearest_latency():
    rows = [_row("ResNet-50", "baseline", "bf16", 2.0, 64.0), _row("TRT-ViT-A", "trt_vit", "bf16", 2.2, 88.0),
            _row("TRT-ViT-B", "trt_vit", "bf16", 3.5, 120.0)]
    (check,) = bench.resnet50_check(rows)
    assert check["variant"] == "TRT-ViT-A"
    assert check["flops_per_ms_ratio"] == pytest.approx((88 / 2.2) / 32)
    assert check["meets_1.2x"]


def test_guideline_summary_and_failed_cases():
    experiments = guideline_experiments()
    rows = []
    for key, experiment in experiments.items():
        for i, member in enumerate(experiment.members):
            rows.append(_row(member.name, key, "fp16", 1.0 + 0.5 * i, 10.0))
    rows[-1]["error"] = "RESOURCE_EXHAUSTED"
    summary = {s["experiment"]: s for s in bench.guideline_summary(rows)}
    assert summary["stage_order"]["holds"] and summary["stage_order"]["min_speedup"] == pytest.approx(1.5)
    assert "error" in summary["mixed_order"]

    def broken(backend):
        raise MemoryError("out of memory")
    failed = bench.measure_entry(bench.Entry("broken", "trt_vit", broken), ["bf16", "fp16"], 1, 32, 1, 1)
    assert [r["dtype"] for r in failed] == ["bf16", "fp16"] and all("MemoryError" in r["error"] for r in failed)


def test_measure_entry_runs_a_small_model():
    cfg = BackboneConfig("mini", (StageSpec("bottleneck", 1, 32, 1), StageSpec("mixed", 1, 64, 2, 2, 2.0)),
                         stem="small", stem_channels=8, head_dim=16, num_classes=10)
    entry = bench.Entry("mini", "trt_vit", lambda backend: Backbone(cfg.replace(attention_backend=backend),
                                                                    rngs=nnx.Rngs(0)))
    (row,) = bench.measure_entry(entry, ["fp32"], 2, 16, 1, 3)
    assert "error" not in row, row
    assert row["params"] == _expected_params(cfg)
    assert row["median_ms"] > 0 and row["images_per_s"] == pytest.approx(2 / (row["median_ms"] / 1e3))
