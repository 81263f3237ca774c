"""tp_attention_block (tiling-AllReduce) on 8 host devices against an
unsharded plain-JAX attention block written here; its chunk plan and cost
model; the schedule in the compiled HLO."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from jax_fastattn import masks  # noqa: E402
from jax_fastattn.parallel import tp_attention_block  # noqa: E402
from jax_fastattn.parallel import tiling_cost  # noqa: E402

B, S, D_MODEL, HQ, HKV, D = 2, 32, 32, 16, 8, 8
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (host) devices")


def make_mesh(shape):
    devices = np.array(jax.devices()[:8]).reshape(shape)
    return Mesh(devices, ("data", "model"))


def make_inputs(seed=0, hq=HQ, hkv=HKV, dtype=jnp.float32):
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    x = jax.random.normal(keys[0], (B, S, D_MODEL), dtype)
    scale = D_MODEL ** -0.5
    params = {
        "wq": jax.random.normal(keys[1], (D_MODEL, hq * D), dtype) * scale,
        "wk": jax.random.normal(keys[2], (D_MODEL, hkv * D), dtype) * scale,
        "wv": jax.random.normal(keys[3], (D_MODEL, hkv * D), dtype) * scale,
        "wo": jax.random.normal(keys[4], (hq * D, D_MODEL), dtype) * (hq * D) ** -0.5,
    }
    return x, params


def rope_tables(theta=10000.0):
    """cos/sin [S, D] as Hugging Face Llama builds them (frequencies repeated
    over the two halves)."""
    inv_freq = 1.0 / theta ** (np.arange(0, D, 2) / D)
    angles = np.arange(S)[:, None] * inv_freq[None, :]
    emb = np.concatenate([angles, angles], axis=-1)
    return jnp.asarray(np.cos(emb), jnp.float32), jnp.asarray(np.sin(emb), jnp.float32)


def reference_block(x, params, hq, hkv, causal, rope=None, segment_ids=None):
    """Unsharded attention block in float32: dense softmax over explicit
    logits, kv heads repeated for GQA."""
    x = x.astype(jnp.float32)
    b, s, _ = x.shape
    q = (x @ params["wq"].astype(jnp.float32)).reshape(b, s, hq, D)
    k = (x @ params["wk"].astype(jnp.float32)).reshape(b, s, hkv, D)
    v = (x @ params["wv"].astype(jnp.float32)).reshape(b, s, hkv, D)
    if rope is not None:
        cos, sin = rope[0][None, :, None, : D // 2], rope[1][None, :, None, : D // 2]

        def rotate(t):  # each pair (i, i + D/2) turned by its angle
            first, second = t[..., : D // 2], t[..., D // 2:]
            return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)

        q, k = rotate(q), rotate(k)
    k = jnp.repeat(k, hq // hkv, axis=2)
    v = jnp.repeat(v, hq // hkv, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D)
    visible = jnp.ones((b, 1, s, s), bool)
    if causal:
        visible = visible & jnp.tril(jnp.ones((s, s), bool))[None, None]
    if segment_ids is not None:
        visible = visible & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    logits = jnp.where(visible, logits, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, s, hq * D)
    return out @ params["wo"].astype(jnp.float32)


def value_and_grads(block, x, params, cotangent):
    """Output and the VJP of a fixed cotangent wrt x and every weight."""
    def run(x, params):
        out, pullback = jax.vjp(block, x, params)
        return out, pullback(cotangent)
    return jax.jit(run)(x, params)


@pytest.mark.parametrize("mesh_shape", [(1, 8), (2, 4)], ids=["1x8", "2x4"])
@pytest.mark.parametrize("num_chunks", [1, 2, 4, 8])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_block_matches_unsharded_reference(mesh_shape, num_chunks, causal):
    mesh = make_mesh(mesh_shape)
    x, params = make_inputs()
    cotangent = jax.random.normal(jax.random.PRNGKey(7), (B, S, D_MODEL))

    def ours(x, params):
        return tp_attention_block(x, params, mesh=mesh, num_chunks=num_chunks, causal=causal, num_heads=HQ,
                                  num_kv_heads=HKV)

    def ref(x, params):
        return reference_block(x, params, HQ, HKV, causal)

    out, (dx, dparams) = value_and_grads(ours, x, params, cotangent)
    ref_out, (ref_dx, ref_dparams) = value_and_grads(ref, x, params, cotangent)
    np.testing.assert_allclose(out, ref_out, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(dx, ref_dx, rtol=2e-5, atol=2e-5)
    for name in ("wq", "wk", "wv", "wo"):
        np.testing.assert_allclose(dparams[name], ref_dparams[name], rtol=2e-5, atol=2e-5, err_msg=name)


def test_eager_call_rope_segments_mha_return_kv():
    """Called outside jit (compiles itself), MHA, RoPE from positions, packed
    documents, and the keys/values a prefill would cache."""
    from jax_fastattn.parallel.tiling_allreduce import rope_tables as block_rope_tables
    mesh = make_mesh((2, 4))
    x, params = make_inputs(seed=3, hq=8, hkv=8)
    cos, sin = rope_tables()
    positions = jnp.broadcast_to(jnp.arange(S), (B, S))
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, D, 2) / D)
    segment_ids = jnp.asarray(np.repeat(np.array([[0, 1, 1, 2], [0, 0, 3, 3]]), S // 4, axis=1), jnp.int32)
    out, k, v = tp_attention_block(x, params, mesh=mesh, num_chunks=4, causal=True, num_heads=8,
                                   rope=block_rope_tables(positions, inv_freq), return_kv=True,
                                   mask=masks.Segments(segment_ids, segment_ids))
    ref = reference_block(x, params, 8, 8, True, rope=(cos, sin), segment_ids=segment_ids)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)
    # Keys rotated pairwise (i, i + D/2) by position * inv_freq[i].
    k_plain = (x @ params["wk"]).reshape(B, S, 8, D)
    c, s_ = cos[None, :, None, : D // 2], sin[None, :, None, : D // 2]
    first, second = k_plain[..., : D // 2], k_plain[..., D // 2:]
    k_ref = jnp.concatenate([first * c - second * s_, second * c + first * s_], axis=-1)
    np.testing.assert_allclose(k, k_ref, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(v, (x @ params["wv"]).reshape(B, S, 8, D), rtol=2e-5, atol=2e-5)


def test_sliding_window():
    mesh = make_mesh((1, 8))
    x, params = make_inputs(seed=4)
    window = 5
    out = jax.jit(lambda x, p: tp_attention_block(
        x, p, mesh=mesh, num_chunks=3, causal=True, mask=masks.SlidingWindow(window, 0), num_heads=HQ,
        num_kv_heads=HKV))(x, params)
    # Reference: the window as a segment-free dense band.
    q_pos, k_pos = np.arange(S)[:, None], np.arange(S)[None, :]
    band = jnp.asarray((k_pos <= q_pos) & (k_pos >= q_pos - window))
    xq = x @ params["wq"]
    q = xq.reshape(B, S, HQ, D)
    k = jnp.repeat((x @ params["wk"]).reshape(B, S, HKV, D), 2, axis=2)
    v = jnp.repeat((x @ params["wv"]).reshape(B, S, HKV, D), 2, axis=2)
    logits = jnp.where(band, jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D), -jnp.inf)
    ref = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v).reshape(B, S, -1) @ params["wo"]
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)


def test_bfloat16_auto_chunks():
    mesh = make_mesh((2, 4))
    x, params = make_inputs(seed=5, dtype=jnp.bfloat16)
    out = tp_attention_block(x, params, mesh=mesh, num_chunks="auto", num_heads=HQ, num_kv_heads=HKV)
    assert out.dtype == jnp.bfloat16
    ref = reference_block(x, params, HQ, HKV, True)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=0, atol=3e-2 * float(jnp.abs(ref).max()))


@pytest.mark.parametrize("num_chunks", [1, 4])
def test_one_independent_reduction_per_chunk(num_chunks):
    """The program issues one all-reduce per chunk, each fed only by its own
    chunk's output projection, and the compiler options keep them apart after
    optimisation (the combiner would otherwise merge them into one)."""
    from jax_fastattn.parallel.tiling_allreduce import overlap_compiler_options
    mesh = make_mesh((1, 8))
    x, params = make_inputs()
    block = lambda x, p: tp_attention_block(x, p, mesh=mesh, num_chunks=num_chunks, num_heads=HQ,  # noqa: E731
                                            num_kv_heads=HKV)
    lowered = jax.jit(block).lower(x, params).as_text()
    assert len(re.findall(r"stablehlo\.all_reduce", lowered)) == num_chunks
    bounds = tiling_cost.chunk_bounds(S, num_chunks, True, D_MODEL, HQ // 8, D)
    for options in (overlap_compiler_options("cpu"), overlap_compiler_options()):
        compiled = jax.jit(block, compiler_options=options).lower(x, params).compile().as_text()
        entry = compiled[compiled.index("ENTRY"):]
        reductions = re.findall(r"= f32\[2,(\d+),32\]\S* all-reduce\(", entry)
        assert sorted(int(rows) for rows in reductions) == sorted(e - s for s, e in bounds), entry


def test_bad_arguments_raise_value_error():
    mesh = make_mesh((1, 8))
    x, params = make_inputs(hq=12, hkv=4)
    with pytest.raises(ValueError, match="multiples of the mesh axis"):
        tp_attention_block(x, params, mesh=mesh, num_heads=12, num_kv_heads=4)
    x, params = make_inputs()
    with pytest.raises(ValueError, match="num_chunks"):
        tp_attention_block(x, params, mesh=mesh, num_chunks=0, num_heads=HQ, num_kv_heads=HKV)
    with pytest.raises(ValueError, match="params\\['wo'\\]"):
        tp_attention_block(x, {**params, "wo": params["wo"][:-1]}, mesh=mesh, num_heads=HQ, num_kv_heads=HKV)
    with pytest.raises(ValueError, match="axis"):
        tp_attention_block(x, params, mesh=mesh, axis="tensor", num_heads=HQ, num_kv_heads=HKV)
    with pytest.raises(ValueError, match="mask"):
        tp_attention_block(x, params, mesh=mesh, num_heads=HQ, num_kv_heads=HKV,
                           mask=masks.Dense(jnp.ones((1, 1, S, S), bool)))
    with pytest.raises(ValueError, match="mask"):
        tp_attention_block(x, params, mesh=mesh, causal=False, num_heads=HQ, num_kv_heads=HKV,
                           mask=masks.SlidingWindow(4, 4))


@pytest.mark.parametrize("seq_len,num_chunks", [(32, 8), (8192, 4), (32768, 8), (1000, 7)])
def test_causal_chunk_bounds_equalise_work(seq_len, num_chunks):
    shape = dict(d_model=4096, local_q_heads=4, head_dim=128)
    bounds = tiling_cost.chunk_bounds(seq_len, num_chunks, True, **shape)
    assert bounds[0][0] == 0 and bounds[-1][1] == seq_len and len(bounds) == num_chunks
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(bounds, bounds[1:]))
    # Work recomputed independently by summing per-row costs.
    rows = np.arange(seq_len)
    per_row = 2 * 2 * 4096 * 4 * 128 + 4 * 4 * 128 * (rows + 1)
    work = np.array([per_row[s:e].sum() for s, e in bounds])
    # Each edge lies within half a tile (128 rows at long sequences, 1 row
    # otherwise) of its exact place.
    tile = 128 if seq_len % 128 == 0 and seq_len >= 256 * num_chunks else 1
    assert np.abs(work - work.mean()).max() <= tile * per_row.max()
    sizes = [e - s for s, e in bounds]
    assert sizes == sorted(sizes, reverse=True)


def test_pipeline_model():
    # One chunk: compute then the whole all-reduce.
    t = tiling_cost.pipeline_time(1.0, [4.0], [3.0])
    assert t["total"] == 8.0 and t["exposed_comm"] == 3.0
    # Comm shorter than the next chunk's compute: only the last one is exposed.
    t = tiling_cost.pipeline_time(1.0, [2.0, 2.0], [1.5, 1.5])
    assert t["total"] == 1.0 + 2.0 + 2.0 + 1.5
    # Comm longer than compute: the link is the bottleneck.
    t = tiling_cost.pipeline_time(0.0, [1.0, 1.0, 1.0], [2.0, 2.0, 2.0])
    assert t["total"] == 1.0 + 3 * 2.0
    model = tiling_cost.TPCostModel(flops_per_s=1e12, link_bytes_per_s=100e9, collective_latency_s=0.0,
                                    chunk_overhead_s=0.0)
    assert tiling_cost.allreduce_time(1e9, 4, model) == pytest.approx(2 * 3 / 4 * 1e9 / 100e9)
    assert tiling_cost.allreduce_time(1e9, 1, model) == 0.0


def test_auto_num_chunks_follows_the_model():
    shape = dict(causal=True, batch=1, d_model=4096, q_heads=32, kv_heads=32, head_dim=128, num_devices=8,
                 bytes_per_element=2)
    gpu = tiling_cost.TPCostModel.for_platform("gpu")
    chosen = tiling_cost.auto_num_chunks(8192, model=gpu, **shape)
    times = {n: tiling_cost.predict_block_time(8192, n, model=gpu, **shape)["total"] for n in range(1, 9)}
    assert chosen > 1 and times[chosen] == min(times.values())
    # A free link leaves nothing to hide: one chunk.
    free_link = tiling_cost.TPCostModel(flops_per_s=600e12, link_bytes_per_s=1e30, collective_latency_s=0.0,
                                        chunk_overhead_s=1e-6)
    assert tiling_cost.auto_num_chunks(8192, model=free_link, **shape) == 1


def llama_forward_with_tp_block(model, tokens, mesh, num_chunks):
    """The tiny Llama's causal forward with each layer's attention replaced by
    tp_attention_block: what its prefill does on a mesh with a "model" axis."""
    from flax import nnx
    from jax_fastattn.parallel.tiling_allreduce import rope_tables as block_rope_tables
    x = model.embed_tokens(tokens)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    d_model = x.shape[-1]
    for index in range(model.cfg.num_hidden_layers):
        if model.layer_storage == "per_layer":
            layer = model.layers[index]
        else:
            graphdef, stacked = nnx.split(model.layers)
            layer = nnx.merge(graphdef, jax.tree.map(lambda a, i=index: a[i], stacked))
        attn = layer.self_attn
        # LinearGeneral kernels [d, H, D] / [H, D, d] are head-major once flattened.
        params = {"wq": attn.query.kernel[...].reshape(d_model, -1), "wk": attn.key.kernel[...].reshape(d_model, -1),
                  "wv": attn.value.kernel[...].reshape(d_model, -1), "wo": attn.out.kernel[...].reshape(-1, d_model)}
        x = x + tp_attention_block(layer.input_layernorm(x), params, mesh=mesh, num_chunks=num_chunks,
                                   num_heads=attn.num_heads, num_kv_heads=attn.num_kv_heads, head_dim=attn.head_dim,
                                   rope=block_rope_tables(positions, attn.inv_freq))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.logits(x)


@pytest.mark.parametrize("layer_storage", ["per_layer", "stacked"])
def test_llama_forward_with_tp_block_matches_model(layer_storage):
    llama = pytest.importorskip("models.llama")
    from flax import nnx
    cfg = llama.LlamaConfig.preset("tiny")
    model = llama.Llama(cfg, rngs=nnx.Rngs(0), layer_storage=layer_storage)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 24), 3, cfg.vocab_size, dtype=jnp.int32)
    expected = model(tokens)
    logits = jax.jit(lambda t: llama_forward_with_tp_block(model, t, make_mesh((2, 4)), 4))(tokens)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(jnp.argmax(logits, -1), jnp.argmax(expected, -1))


def test_llama_generates_same_tokens_on_a_model_mesh(monkeypatch):
    """Greedy generation of the tiny Llama on a (data, model) mesh equals the
    one-device run; skipped after the check if the prefill does not route its
    attention through tp_attention_block."""
    llama = pytest.importorskip("models.llama")
    from flax import nnx
    from models.llama import sharding as llama_sharding
    from jax_fastattn.parallel import tiling_allreduce

    calls = []
    original = tiling_allreduce._local_block

    def counting(plan, *args):
        calls.append(plan.bounds)
        return original(plan, *args)

    monkeypatch.setattr(tiling_allreduce, "_local_block", counting)
    cfg = llama.LlamaConfig.preset("tiny")
    model = llama.Llama(cfg, rngs=nnx.Rngs(0))
    prompts = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 3, cfg.vocab_size, dtype=jnp.int32)
    lengths = jnp.array([12, 7], jnp.int32)
    expected = llama.generate(model, prompts, lengths, max_new_tokens=4)
    tokens = llama.generate(model, prompts, lengths, max_new_tokens=4, mesh=llama_sharding.make_mesh("2x4"))
    np.testing.assert_array_equal(tokens, expected)
    if not calls:
        pytest.skip("models/llama prefill does not call tp_attention_block (not wired in)")


SCHEDULED_GPU_HLO = """HloModule jit_block, is_scheduled=true

ENTRY %main.7_spmd (param: bf16[1,256,64]) -> bf16[1,256,64] {
  %param = bf16[1,256,64]{2,1,0} parameter(0)
  %fusion.1 = bf16[1,128,64]{2,1,0} fusion(%param), kind=kCustom, calls=%gemm_1
  %all-reduce-start = bf16[1,128,64]{2,1,0} all-reduce-start(%fusion.1), channel_id=1, to_apply=%add
  %custom-call.2 = (bf16[1,128,4,16]{3,2,1,0}, f32[1,4,128]{2,1,0}) custom-call(%param), custom_call_target="attn"
  %fusion.2 = bf16[1,128,64]{2,1,0} fusion(%custom-call.2), kind=kCustom, calls=%gemm_2
  %all-reduce-start.1 = bf16[1,128,64]{2,1,0} all-reduce-start(%fusion.2), channel_id=2, to_apply=%add
  %all-reduce-done = bf16[1,128,64]{2,1,0} all-reduce-done(%all-reduce-start)
  %all-reduce-done.1 = bf16[1,128,64]{2,1,0} all-reduce-done(%all-reduce-start.1)
  ROOT %concatenate = bf16[1,256,64]{2,1,0} concatenate(%all-reduce-done, %all-reduce-done.1), dimensions={1}
}
"""


def test_schedule_parser_reads_async_pairs():
    """tools/gpu/tp_schedule.py's reading of a scheduled GPU module: pairs
    matched by name, compute counted between start and done."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("tp_schedule", os.path.join(ROOT, "tools", "gpu", "tp_schedule.py"))
    tp_schedule = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tp_schedule)
    schedule = tp_schedule.parse_schedule(SCHEDULED_GPU_HLO)
    assert [p["compute_between"] for p in schedule["pairs"]] == [2, 0]
    assert schedule["pairs"][0]["compute_ops_between"] == ["%custom-call.2", "%fusion.2"]
    assert schedule["sync_all_reduces"] == 0
    result = {"platform": "gpu", "variants": {"library": schedule}}
    assert tp_schedule.verdict(result, 2) == "ok"
    assert tp_schedule.verdict(result, 4).startswith("2 async all-reduce pairs")
    # Only a slice between start and done (every chunk's projection merged
    # into one GEMM before the first start): nothing is hidden.
    sliced = SCHEDULED_GPU_HLO.replace(
        '%custom-call.2 = (bf16[1,128,4,16]{3,2,1,0}, f32[1,4,128]{2,1,0}) custom-call(%param), '
        'custom_call_target="attn"\n', "").replace("kind=kCustom, calls=%gemm_2", "kind=kLoop, calls=%slice_2")
    schedule = tp_schedule.parse_schedule(sliced)
    assert [(p["compute_between"], p["heavy_between"]) for p in schedule["pairs"]] == [(1, 0), (0, 0)]
    assert tp_schedule.verdict({"platform": "gpu", "variants": {"library": schedule}}, 2).startswith("only 0")


@pytest.mark.gpu
def test_gpu_schedule_has_async_allreduce_pairs_with_compute_between(tmp_path):
    """2- and 8-H100 topologies compiled without those GPUs (deviceless, jax's
    CUDA plugin): tools/gpu/tp_schedule.py --check asserts one async
    all-reduce start/done pair per chunk and compute between the start and
    done of every chunk but the last."""
    out = tmp_path / "schedule.json"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu", "tp_schedule.py"), "--check",
                             "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
