"""models.llama wired to the parallel and offload systems, each against the
plain one-device run of the same model: generate() over a KV cache split
between device and host memory (streamed blocks, CPU-attended part), and the
context-parallel prefill on 8 host devices (zig-zag order, ring and
all-gather). The tensor-parallel prefill through tp_attention_block is
tested in tests/test_tiling_allreduce.py."""
import json
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jax_fastattn.parallel import context as cp_context  # noqa: E402
from helpers import tiny_llama  # noqa: E402
from models.llama import generate, sharding  # noqa: E402
from models.llama import __main__ as cli  # noqa: E402
from models.llama.host_cache import HostCacheOptions, place  # noqa: E402
from models.llama.model import with_layer_storage  # noqa: E402

PROMPT_LEN, NEW_TOKENS = 10, 5
LENGTHS = np.array([10, 6, 8, 9], np.int32)   # ragged; every row has filled 6 positions


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def prompts():
    return np.random.default_rng(3).integers(0, 256, (len(LENGTHS), PROMPT_LEN)).astype(np.int32)


@pytest.fixture(scope="module")
def greedy(model, prompts):
    return np.asarray(generate(model, prompts, LENGTHS, max_new_tokens=NEW_TOKENS))


# ----------------------------------------------------------------------------
# Host KV cache


@pytest.mark.parametrize("strategy,storage", [("stream", "stacked"), ("split", "stacked"), ("stream", "per_layer")])
def test_host_cache_generate_equals_device(model, prompts, greedy, strategy, storage):
    """2 of the 6 shared prompt positions per layer on the device, 4 in host
    memory (streamed in blocks of 2, or attended by the CPU device); with
    per-layer storage the host loop takes each layer's own buffers."""
    options = HostCacheOptions(device_tokens=2, block_tokens=2, strategy=strategy)
    tokens = generate(with_layer_storage(model, storage), prompts, LENGTHS, max_new_tokens=NEW_TOKENS,
                      kv_cache="host", host_cache_options=options)
    np.testing.assert_array_equal(np.asarray(tokens), greedy)


def test_host_cache_placement_puts_positions_in_host_memory(model):
    """The forced split really uses host memory: the stream part in the
    accelerator's pinned host memory, the split part on another device; the
    device part holds the rest of the prompts and room for the new tokens."""
    cfg = model.cfg
    b, layers, p, hkv, d = 2, cfg.num_hidden_layers, 12, cfg.num_key_value_heads, cfg.head_dim
    keys = jax.random.normal(jax.random.key(0), (b, layers, p, hkv, d))
    lengths = jnp.array([12, 9], jnp.int32)
    for strategy in ("stream", "split"):
        options = HostCacheOptions(device_tokens=3, block_tokens=4, strategy=strategy)
        device_parts, host_parts, plan = place(cfg, keys, keys, lengths, 4, mode="host", options=options)
        assert (plan.context_tokens, plan.device_tokens) == (9, 3)
        assert len(device_parts) == len(host_parts) == layers
        host = host_parts[1]
        if strategy == "stream":
            assert host.stream_k.sharding.memory_kind == "pinned_host" and host.stream_tokens == 6
            np.testing.assert_array_equal(np.asarray(host.stream_k[0]), np.asarray(keys[:, 1, :4]))
        else:
            assert host.cpu_tokens == 6 and host.cpu_k.devices() != device_parts[1].device_k.devices()
            np.testing.assert_array_equal(np.asarray(host.cpu_k), np.asarray(keys[:, 1, :6]))
        device_k = np.asarray(device_parts[1].device_k)
        assert device_k.shape[1] == 3 + (12 - 9) + 4
        np.testing.assert_array_equal(device_k[:, :6], np.asarray(keys[:, 1, 6:12]))


def test_host_cache_bad_arguments(model, prompts):
    with pytest.raises(ValueError, match="kv_cache"):
        generate(model, prompts, LENGTHS, max_new_tokens=2, kv_cache="disk")
    with pytest.raises(ValueError, match="mesh"):
        generate(model, prompts, LENGTHS, max_new_tokens=2, kv_cache="host", mesh=sharding.make_mesh("2x4"))
    with pytest.raises(ValueError, match="host_cache_options"):
        generate(model, prompts, LENGTHS, max_new_tokens=2, kv_cache="host", host_cache_options={"device_tokens": 2})
    with pytest.raises(ValueError, match="device_tokens"):
        HostCacheOptions(device_tokens=-1)
    with pytest.raises(ValueError, match="strategy"):
        HostCacheOptions(strategy="disk")


# ----------------------------------------------------------------------------
# Context-parallel prefill


def prefill_logits(model, prompts, lengths, cp_mesh):
    """Prefill through a fresh jit (so that a patched strategy choice is traced anew)."""
    return jax.jit(lambda t, n: model.prefill(t, n, PROMPT_LEN + 2, cp_mesh=cp_mesh))(
        jnp.asarray(prompts), jnp.asarray(lengths))


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("strategy", ["auto", "ring"])
def test_context_parallel_prefill_equals_one_device(model, prompts, cp, strategy, monkeypatch):
    """Logits of each row's last token and the natural-order cache; "ring"
    forces the ring where the chooser takes the all-gather at this length.

    Tolerance: with 10x weights the logits (|x| up to ~75) move by up to
    ~2e-5 relative between one-device runs of different shapes (the row of
    length 6 run alone vs padded to 10), so the bound is 5e-5 of the
    largest value. A key leaking across the causal or padding boundary is
    caught exactly below: tokens past a row's length must not change it."""
    if strategy == "ring":
        monkeypatch.setattr(cp_context, "choose_strategy", lambda *args, **kwargs: "ring")
    cp_mesh = sharding.make_cp_mesh(cp)
    logits, k_cache, v_cache = prefill_logits(model, prompts, LENGTHS, None)
    cp_logits, cp_k, cp_v = prefill_logits(model, prompts, LENGTHS, cp_mesh)
    for got, want in ((cp_logits, logits), (cp_k, k_cache), (cp_v, v_cache)):
        np.testing.assert_allclose(got, want, rtol=0, atol=5e-5 * float(jnp.max(jnp.abs(want))))
    np.testing.assert_array_equal(jnp.argmax(cp_logits, -1), jnp.argmax(logits, -1))
    changed = np.where(np.arange(PROMPT_LEN)[None, :] < LENGTHS[:, None], prompts, (prompts + 1) % 256)
    np.testing.assert_array_equal(prefill_logits(model, changed, LENGTHS, cp_mesh)[0], cp_logits)


@pytest.mark.parametrize("cp", [2, 4])
def test_context_parallel_generate_equals_one_device(model, prompts, greedy, cp):
    tokens = generate(model, prompts, LENGTHS, max_new_tokens=NEW_TOKENS, context_parallel=cp)
    np.testing.assert_array_equal(np.asarray(tokens), greedy)


def test_context_parallel_bad_arguments(model, prompts):
    with pytest.raises(ValueError, match="context_parallel"):
        generate(model, prompts, LENGTHS, max_new_tokens=2, context_parallel=0)
    with pytest.raises(ValueError, match="context_parallel"):
        generate(model, prompts, LENGTHS, max_new_tokens=2, context_parallel=2, mesh=sharding.make_mesh("2x4"))
    with pytest.raises(ValueError, match="context_parallel"):
        generate(model, prompts, LENGTHS, max_new_tokens=2, context_parallel=jax.device_count() + 1)


def test_cli_context_parallel_prefill_with_host_cache(tmp_path):
    out = tmp_path / "llama.json"
    common = ["--config", "tiny", "--batch", "2", "--prompt-len", "16", "--gen", "3", "--ragged"]
    plain = cli.main(common)
    result = cli.main(common + ["--context-parallel", "2", "--kv-cache", "host", "--device-kv-tokens", "4",
                                "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["context_parallel"] == 2 and saved["kv_cache"] == "host" and "stream" in saved["plan"]
    assert saved["first_tokens"] == plain["first_tokens"] == result["first_tokens"]
    with pytest.raises(ValueError, match="--mesh"):
        cli.main(common + ["--mesh", "1x2", "--context-parallel", "2"])
