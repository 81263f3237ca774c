"""models.llama: HF checkpoint loading, generate() against recomputation,
sharded generate against unsharded (8 host devices, see conftest.py)."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import nnx

from helpers import tiny_llama

from models.llama import Llama, LlamaConfig, generate, load_safetensors
from models.llama import __main__ as cli
from models.llama import generation, sharding
from models.llama.model import with_layer_storage

PROMPT_LEN, NEW_TOKENS = 10, 6
LENGTHS = np.array([10, 4, 7, 1], np.int32)  # ragged, right-padded


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def prompts():
    return np.random.default_rng(0).integers(0, 256, (len(LENGTHS), PROMPT_LEN)).astype(np.int32)


@pytest.fixture(scope="module")
def greedy(model, prompts):
    return np.asarray(generate(model, prompts, LENGTHS, max_new_tokens=NEW_TOKENS))


# ----------------------------------------------------------------------------
# Checkpoint loading against a numpy forward written from HF's definitions


def hf_forward(w, tokens, cfg):
    """LlamaForCausalLM in float64 numpy on HF-named [out, in] weights."""
    def rms(x, scale):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.rms_norm_eps) * scale

    def rotate(x, cos, sin):
        half = x.shape[-1] // 2
        return x * cos + np.concatenate([-x[..., half:], x[..., :half]], -1) * sin

    batch, seq = tokens.shape
    hq, hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, hd, 2) / hd)
    angles = np.arange(seq)[:, None] * inv_freq[None]
    cos = np.cos(np.concatenate([angles, angles], -1))[None, :, None]
    sin = np.sin(np.concatenate([angles, angles], -1))[None, :, None]
    causal = np.tril(np.ones((seq, seq), bool))
    x = w["model.embed_tokens.weight"][tokens]
    for i in range(cfg.num_hidden_layers):
        p = lambda name: w[f"model.layers.{i}.{name}.weight"]
        h = rms(x, p("input_layernorm"))
        q = rotate((h @ p("self_attn.q_proj").T).reshape(batch, seq, hq, hd), cos, sin)
        k = rotate((h @ p("self_attn.k_proj").T).reshape(batch, seq, hkv, hd), cos, sin)
        v = (h @ p("self_attn.v_proj").T).reshape(batch, seq, hkv, hd)
        k, v = np.repeat(k, hq // hkv, axis=2), np.repeat(v, hq // hkv, axis=2)
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
        scores = np.where(causal, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, seq, hq * hd)
        x = x + out @ p("self_attn.o_proj").T
        h = rms(x, p("post_attention_layernorm"))
        gate = h @ p("mlp.gate_proj").T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ p("mlp.up_proj").T)) @ p("mlp.down_proj").T
    return rms(x, w["model.norm.weight"]) @ w["lm_head.weight"].T


def test_safetensors_loader_matches_hf_forward(tmp_path):
    from safetensors.numpy import save_file

    cfg = dataclasses.replace(LlamaConfig.preset("tiny"), tie_word_embeddings=False, rope_scaling=None,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, hidden_size=48)
    rng = np.random.default_rng(1)
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,),
              "lm_head.weight": (cfg.vocab_size, d)}
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        shapes.update({pre + "self_attn.q_proj.weight": (4 * hd, d), pre + "self_attn.k_proj.weight": (2 * hd, d),
                       pre + "self_attn.v_proj.weight": (2 * hd, d), pre + "self_attn.o_proj.weight": (d, 4 * hd),
                       pre + "mlp.gate_proj.weight": (f, d), pre + "mlp.up_proj.weight": (f, d),
                       pre + "mlp.down_proj.weight": (d, f), pre + "input_layernorm.weight": (d,),
                       pre + "post_attention_layernorm.weight": (d,)})
    weights = {name: (rng.normal(1.0, 0.1, s) if len(s) == 1 else rng.normal(0, 0.2, s)).astype(np.float32)
               for name, s in shapes.items()}
    names = sorted(weights)  # a checkpoint in two shards, as HF writes large ones
    save_file({n: weights[n] for n in names[::2]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({n: weights[n] for n in names[1::2]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({**dataclasses.asdict(cfg), "model_type": "llama"}))

    tokens = rng.integers(0, cfg.vocab_size, (2, 9))
    want = hf_forward({k: v.astype(np.float64) for k, v in weights.items()}, tokens, cfg)
    for storage in ("stacked", "per_layer"):
        model = load_safetensors(str(tmp_path), backend="cpu", layer_storage=storage)
        assert model.cfg == cfg and model.layer_storage == storage
        np.testing.assert_allclose(model(jnp.asarray(tokens)), want, atol=2e-4, rtol=2e-4)

    del weights["lm_head.weight"]
    (tmp_path / "model-00001-of-00002.safetensors").unlink()
    save_file(weights, str(tmp_path / "model-00002-of-00002.safetensors"))
    with pytest.raises(ValueError, match="lm_head.weight"):
        load_safetensors(str(tmp_path), backend="cpu")


# ----------------------------------------------------------------------------
# generate()


def test_greedy_generate_equals_recomputing_the_full_prefix(model, prompts, greedy):
    """Ragged rows: each new token is the argmax of a full causal forward
    (no cache) over that row's own prompt and the tokens before it."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
    seqs = np.zeros((len(LENGTHS), PROMPT_LEN + NEW_TOKENS), np.int32)
    seqs[:, :PROMPT_LEN] = prompts
    for step in range(NEW_TOKENS):
        logits = np.asarray(forward(state, seqs))
        for b, length in enumerate(LENGTHS):
            seqs[b, length + step] = np.argmax(logits[b, length + step - 1])
    want = np.stack([seqs[b, n:n + NEW_TOKENS] for b, n in enumerate(LENGTHS)])
    np.testing.assert_array_equal(greedy, want)
    assert len(np.unique(greedy)) > 4  # not a collapsed sequence


def test_stacked_storage_generates_the_same_tokens(model, prompts, greedy):
    """Stacked layers run by lax.scan: same weights (with_layer_storage),
    same logits and greedy tokens as the per-layer default; the conversion
    back restores the per-layer arrays."""
    assert model.layer_storage == "per_layer"
    stacked = with_layer_storage(model, "stacked")
    assert stacked.layer_storage == "stacked"
    query = stacked.layers.self_attn.query.kernel[...]
    assert query.shape[0] == model.cfg.num_hidden_layers
    np.testing.assert_array_equal(query[1], model.layers[1].self_attn.query.kernel[...])
    tokens = jnp.asarray(prompts)
    want = np.asarray(model(tokens))  # float32 logits up to ~1e2: compare to the largest
    np.testing.assert_allclose(stacked(tokens), want, atol=5e-5 * np.abs(want).max(), rtol=0)
    np.testing.assert_array_equal(generate(stacked, prompts, LENGTHS, max_new_tokens=NEW_TOKENS), greedy)
    back = with_layer_storage(stacked, "per_layer")
    np.testing.assert_array_equal(back.layers[1].mlp.down_proj.kernel[...], model.layers[1].mlp.down_proj.kernel[...])
    with pytest.raises(ValueError, match="layer_storage"):
        with_layer_storage(model, "scanned")


def test_param_specs_follow_the_layer_storage():
    """A stacked parameter's leading layer axis is replicated; per-layer
    parameters have none, and split the same dims over "model"."""
    cfg = LlamaConfig.preset("tiny")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    for storage, lead in (("stacked", (None,)), ("per_layer", ())):
        abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), attention="xla", layer_storage=storage))
        specs = sharding.param_shardings(nnx.state(abstract), cfg, mesh)
        layer = specs["layers"] if storage == "stacked" else specs["layers"][0]
        assert layer["self_attn"]["query"]["kernel"].spec == jax.sharding.PartitionSpec(*lead, None, "model", None)
        assert layer["mlp"]["down_proj"]["kernel"].spec == jax.sharding.PartitionSpec(*lead, "model", None)
        assert specs["embed_tokens"]["embedding"].spec == jax.sharding.PartitionSpec(None, None)


def test_stop_tokens_and_top_k_1_sampling(model, prompts, greedy):
    """top_k=1 sampling is greedy; rows end after a stop token (then pad 0)."""
    stop = int(greedy[0, 2])
    got = np.asarray(generate(model, prompts, LENGTHS, max_new_tokens=NEW_TOKENS, key=jax.random.key(3),
                              temperature=1.0, top_k=1, stop_tokens=(stop,)))
    want = greedy.copy()
    for row in want:
        hits = np.flatnonzero(row == stop)
        if hits.size:
            row[hits[0] + 1:] = 0
    np.testing.assert_array_equal(got, want)


def test_sample_top_k_top_p_and_temperature():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.log(jnp.asarray(np.tile(probs, (4000, 1)), jnp.float32))
    draw = lambda **kw: np.asarray(generation.sample(logits, jax.random.key(0), **kw))
    assert set(draw(temperature=1.0, top_k=2, top_p=None)) == {0, 1}
    assert set(draw(temperature=1.0, top_k=None, top_p=0.7)) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(draw(temperature=1.0, top_k=None, top_p=0.85)) == {0, 1, 2}
    freq = np.bincount(draw(temperature=1.0, top_k=None, top_p=None), minlength=4) / 4000
    np.testing.assert_allclose(freq, probs, atol=0.03)
    hot = np.bincount(draw(temperature=0.5, top_k=None, top_p=None), minlength=4) / 4000
    np.testing.assert_allclose(hot, probs ** 2 / np.sum(probs ** 2), atol=0.03)
    np.testing.assert_array_equal(draw(temperature=0.0, top_k=None, top_p=None), 0)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (XLA_FLAGS, see conftest.py)")
@pytest.mark.parametrize("shape", ["2x4", "1x8"])
def test_sharded_generate_equals_unsharded_with_no_cache_gather(model, prompts, greedy, shape):
    mesh = sharding.make_mesh(shape)
    got = generate(model, prompts, LENGTHS, max_new_tokens=NEW_TOKENS, mesh=mesh)
    np.testing.assert_array_equal(got, greedy)

    # The compiled decode step: the cache stays split (batch over data, kv
    # heads over model) and is never gathered; the tensor-parallel blocks
    # reduce with all-reduces.
    cfg = model.cfg
    graphdef, state = nnx.split(model)
    state, tokens, lengths = generation.place(graphdef, state, mesh, jnp.asarray(prompts[:, 0]),
                                              jnp.asarray(LENGTHS))
    cache_sharding = jax.sharding.NamedSharding(mesh, sharding.cache_spec(cfg, mesh))
    k_cache, v_cache = (jax.device_put(c, cache_sharding) for c in model.init_cache(len(LENGTHS), 32))

    def step(state, tokens, k_cache, v_cache, lengths):
        return nnx.merge(graphdef, state).decode_step(tokens, k_cache, v_cache, lengths, mesh=mesh)

    compiled = jax.jit(step, donate_argnums=(2, 3)).lower(state, tokens, k_cache, v_cache, lengths).compile()
    hlo = compiled.as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo
    assert "all-reduce" in hlo
    _, k_out, _ = compiled(state, tokens, k_cache, v_cache, lengths)
    assert k_out.sharding.is_equivalent_to(cache_sharding, k_out.ndim)


def test_decode_loop_donates_the_cache_and_never_copies_it(model):
    """The token loop's cache is aliased to its input (donated) and no copy of
    a whole cache appears in the compiled loop: the writes are in place."""
    graphdef, state = nnx.split(model)
    k_cache, v_cache = model.init_cache(2, 24)
    compiled = generation.decode.lower(graphdef, state, jnp.zeros((2, model.cfg.vocab_size)), k_cache, v_cache,
                                       jnp.array([3, 5]), jax.random.key(0), max_new_tokens=4).compile()
    hlo = compiled.as_text()
    cache_type = "f32[" + ",".join(map(str, k_cache.shape)) + "]"
    alias = hlo.split("input_output_alias={", 1)[1].split("}, entry", 1)[0]
    assert "{1}: (" in alias and "{2}: (" in alias  # outputs 1, 2 (k_cache, v_cache) reuse input buffers
    copies = [line for line in hlo.splitlines() if f"= {cache_type}" in line and " copy(" in line]
    assert not copies, copies


# ----------------------------------------------------------------------------
# CLI and argument errors


def test_cli_reports_throughput(tmp_path):
    out = tmp_path / "run.json"
    result = cli.main(["--config", "tiny", "--batch", "2", "--prompt-len", "16", "--gen", "4", "--ragged",
                       "--mesh", "2x2", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["decode_steps"] == 3 and saved["mesh"] == "2x2"
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "ms_per_token"):
        assert saved[key] > 0 and saved[key] == pytest.approx(result[key])


def test_bad_arguments_raise_value_error(model, prompts):
    cfg = LlamaConfig.preset("tiny")
    with pytest.raises(ValueError, match="config name"):
        LlamaConfig.preset("llama-9b")
    with pytest.raises(ValueError, match="attention"):
        Llama(cfg, rngs=nnx.Rngs(0), attention="flash")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="cudnn"):
            Llama(cfg, rngs=nnx.Rngs(0), attention="cudnn")
    bad = [dict(prompt_lengths=np.array([11, 1, 1, 1])), dict(max_new_tokens=0), dict(temperature=1.0),
           dict(top_k=0), dict(top_p=1.5), dict(prompt_lengths=np.array([1, 1]))]
    for override in bad:
        kwargs = {"prompt_lengths": LENGTHS, "max_new_tokens": 2, **override}
        with pytest.raises(ValueError):
            generate(model, prompts, **kwargs)
    with pytest.raises(ValueError, match="data"):
        generate(model, prompts[:3], LENGTHS[:3], max_new_tokens=2, mesh=sharding.make_mesh("2x4"))
