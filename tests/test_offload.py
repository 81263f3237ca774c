"""merge_partials and the offloaded (device + host) KV cache, against a numpy
reference written here: partial attention over a key subset, with its lse."""
import dataclasses
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jax_fastattn import flash_attention, masks, merge_partials, offload  # noqa: E402


# ----------------------------------------------------------------------------- reference

def np_attention(q, k, v, visible, scale):
    """q [B, Sq, Hq, D], k/v [B, Skv, Hkv, D], visible bool [B, Hq|1, Sq, Skv]
    -> (out [B, Sq, Hq, D] float64, lse [B, Hq, Sq]); rows seeing nothing give
    zeros and lse -inf."""
    q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    logits = np.where(visible, logits, -np.inf)
    row_max = logits.max(-1, keepdims=True)
    safe = np.where(np.isfinite(row_max), row_max, 0.0)
    probs = np.exp(logits - safe)
    total = probs.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", probs / np.where(total > 0, total, 1.0), v)
    with np.errstate(divide="ignore"):
        lse = np.where(total[..., 0] > 0, safe[..., 0] + np.log(np.where(total[..., 0] > 0, total[..., 0], 1)),
                       -np.inf)
    return out, lse


def np_decode(q, k, v, lengths, scale=None):
    """Decode reference: q [B, Hq, D] over k/v[:, :lengths] -> (out, lse [B, Hq])."""
    scale = scale or 1.0 / np.sqrt(q.shape[-1])
    visible = (np.arange(k.shape[1])[None, :] < np.asarray(lengths)[:, None])[:, None, None, :]
    out, lse = np_attention(np.asarray(q)[:, None], k, v, visible, scale)
    return out[:, 0], lse[..., 0]


def assert_close(actual, expected, tol):
    actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    assert not np.isnan(actual).any()
    assert np.array_equal(np.isfinite(actual), np.isfinite(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(actual[finite], expected[finite], atol=tol * max(1.0, np.abs(expected[finite]).max()),
                               rtol=0)


def random(seed, *shape, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


# ----------------------------------------------------------------------------- merge_partials

@pytest.mark.parametrize("parts", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("causal", [False, True])
def test_merge_random_splits_equal_single_shot(parts, causal):
    rng = np.random.default_rng(parts + 10 * causal)
    b, sq, skv, hq, hkv, d = 2, 5, 37, 4, 2, 8
    q, k, v = random(1, b, sq, hq, d), random(2, b, skv, hkv, d), random(3, b, skv, hkv, d)
    scale = 0.3
    base = np.ones((b, 1, sq, skv), bool)
    if causal:   # bottom-right aligned; with sq=5 rows 0.. see keys <= i + 32
        base &= np.arange(skv)[None, :] <= np.arange(sq)[:, None] + skv - sq
    base[1, :, 0, :] = False                           # a row that sees no key at all
    owner = rng.integers(0, parts, size=skv)           # random disjoint split of the keys
    if parts > 1:
        owner[owner == parts - 1] = 0                  # the last part is always empty
    outs, lses = [], []
    for p in range(parts):
        out, lse = np_attention(q, k, v, base & (owner == p), scale)
        outs.append(jnp.asarray(out, jnp.float32))
        lses.append(jnp.asarray(lse, jnp.float32))
    merged, merged_lse = merge_partials(outs, lses)
    expected, expected_lse = np_attention(q, k, v, base, scale)
    assert_close(merged, expected, 1e-5)
    assert_close(merged_lse, expected_lse, 1e-5)
    assert np.all(np.asarray(merged)[1, 0] == 0) and np.isneginf(np.asarray(merged_lse)[1, :, 0]).all()


@pytest.mark.parametrize("causal", [False, True])
def test_merge_of_flash_attention_parts(causal):
    """The production use: kernel partials over key ranges (Dense masks),
    merged, equal to one call over all keys."""
    b, sq, skv, hq, hkv, d = 1, 6, 50, 4, 1, 16
    q, k, v = random(4, b, sq, hq, d), random(5, b, skv, hkv, d), random(6, b, skv, hkv, d)
    bounds = [0, 7, 7, 30, 50]                         # includes an empty range
    visible = np.ones((1, 1, sq, skv), bool)
    if causal:
        visible &= np.arange(skv)[None, :] <= np.arange(sq)[:, None] + skv - sq
    outs, lses = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        part = visible & (np.arange(skv) >= lo) & (np.arange(skv) < hi)
        out, lse = flash_attention(q, k, v, mask=masks.Dense(jnp.asarray(part)), return_lse=True, backend="cpu")
        outs.append(out)
        lses.append(lse)
    merged, merged_lse = merge_partials(outs, lses)
    expected, expected_lse = np_attention(q, k, v, visible, 1 / np.sqrt(d))
    assert_close(merged, expected, 1e-5)
    assert_close(merged_lse, expected_lse, 1e-5)


def test_merge_decode_shape_and_all_empty():
    outs = [random(7, 2, 3, 4), jnp.zeros((2, 3, 4))]
    lses = [jnp.full((2, 3), -jnp.inf), jnp.full((2, 3), -jnp.inf)]
    out, lse = merge_partials(outs, lses)
    assert np.all(np.asarray(out) == 0) and np.isneginf(np.asarray(lse)).all()


def test_merge_gradients_match_single_shot_and_are_finite():
    """Differentiable through out and lse; an empty part (lse -inf) gives no NaN."""
    b, s, hq, d, skv = 1, 3, 2, 4, 12
    q, k, v = random(8, b, s, hq, d), random(9, b, skv, hq, d), random(10, b, skv, hq, d)

    def jnp_partial(q, lo, hi):
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
        keep = (jnp.arange(skv) >= lo) & (jnp.arange(skv) < hi)
        logits = jnp.where(keep, logits, -jnp.inf)
        lse = jax.nn.logsumexp(logits, axis=-1) if hi > lo else jnp.full(logits.shape[:-1], -jnp.inf)
        probs = jnp.exp(logits - jnp.where(jnp.isfinite(lse), lse, 0)[..., None]) if hi > lo else jnp.zeros_like(logits)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v), lse

    def merged_loss(q):
        parts = [jnp_partial(q, lo, hi) for lo, hi in ((0, 5), (5, 5), (5, 12))]
        out, lse = merge_partials([p[0] for p in parts], [p[1] for p in parts])
        return jnp.sum(out * v[:, :s]) + jnp.sum(lse)

    def single_loss(q):
        out, lse = jnp_partial(q, 0, skv)
        return jnp.sum(out * v[:, :s]) + jnp.sum(lse)

    grad, expected = jax.grad(merged_loss)(q), jax.grad(single_loss)(q)
    assert np.isfinite(np.asarray(grad)).all()
    np.testing.assert_allclose(np.asarray(grad), np.asarray(expected), atol=1e-5)


def test_merge_bad_input():
    with pytest.raises(ValueError, match="outs"):
        merge_partials([], [])
    with pytest.raises(ValueError, match="lses"):
        merge_partials([jnp.zeros((1, 2, 4))], [jnp.zeros((1, 3))])


# ----------------------------------------------------------------------------- partials

@pytest.mark.parametrize("backend", ["einsum", "cpu", "decode", "decode:cpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_partial_decode_matches_reference(backend, dtype):
    b, s, hq, hkv, d = 3, 96, 8, 2, 32
    q, k, v = random(11, b, hq, d, dtype=dtype), random(12, b, s, hkv, d, dtype=dtype), \
        random(13, b, s, hkv, d, dtype=dtype)
    lengths = jnp.array([96, 0, 41], jnp.int32)
    out, lse = offload.partial_decode(q, k, v, lengths, backend=backend, kv_chunks=3 if backend == "cpu" else None)
    expected, expected_lse = np_decode(q, k, v, lengths)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    assert_close(out, expected, tol)
    assert_close(lse, expected_lse, tol)


@pytest.mark.parametrize("backend", ["cpu", "decode:cpu"])
def test_partial_decode_kernels_ignore_garbage_past_length(backend):
    b, s, h, d = 1, 64, 2, 8
    q, k, v = random(14, b, h, d), random(15, b, s, h, d), random(16, b, s, h, d)
    k_bad = k.at[:, 40:].set(jnp.nan)
    v_bad = v.at[:, 40:].set(jnp.nan)
    out, lse = offload.partial_decode(q, k_bad, v_bad, jnp.array([40]), backend=backend,
                                      kv_chunks=4 if backend == "cpu" else None)
    expected, expected_lse = np_decode(q, k, v, np.array([40]))
    assert_close(out, expected, 1e-5)
    assert_close(lse, expected_lse, 1e-5)


# ----------------------------------------------------------------------------- offloaded cache

THROUGHPUTS = offload.Throughputs(pcie_bytes_per_s=50e9, accelerator_bytes_per_s=4e12, cpu_bytes_per_s=25e9)


def small_plan(strategy, context, bytes_per_token, device_tokens, block_tokens=16):
    p = offload.plan(context, kv_bytes_per_token=bytes_per_token, device_kv_bytes=device_tokens * bytes_per_token,
                     throughputs=THROUGHPUTS, strategy=strategy, position_quantum=1)
    return dataclasses.replace(p, block_tokens=block_tokens)    # test-sized blocks (the planner's are >= 1 MiB)


@pytest.mark.parametrize("strategy", ["stream", "split", "both", "device"])
def test_offloaded_decode_equals_single_cache(strategy):
    b, s, hq, hkv, d = 2, 150, 4, 2, 16
    q, k, v = random(17, b, hq, d), random(18, b, s, hkv, d), random(19, b, s, hkv, d)
    bytes_per_token = 2 * b * hkv * d * 4
    if strategy == "both":
        p = dataclasses.replace(small_plan("stream", s, bytes_per_token, 40), stream_tokens=70, cpu_tokens=40)
    else:
        p = small_plan("stream" if strategy == "device" else strategy, s, bytes_per_token,
                       s if strategy == "device" else 40)
    cache = offload.OffloadedKV.build(k, v, p, device_capacity=p.device_tokens + 8)
    assert (cache.stream_k is not None) == (strategy in ("stream", "both"))
    assert (cache.cpu_k is not None) == (strategy in ("split", "both"))
    if cache.stream_k is not None:
        assert cache.stream_k.sharding.memory_kind == "pinned_host"
        assert cache.stream_k.shape[2] == 16
    if cache.cpu_k is not None:
        assert cache.cpu_k.devices() != cache.device_k.devices()      # a separate device computes it
    lengths = jnp.array([150, 53], jnp.int32)        # row 1 ends inside a host part
    expected, expected_lse = np_decode(q, k, v, lengths)
    for backend, cpu_backend in (("einsum", "decode:cpu"), ("decode", "cpu")):
        out, lse = offload.decode_attention_offloaded(q, cache, lengths, return_lse=True, backend=backend,
                                                      cpu_backend=cpu_backend)
        assert_close(out, expected, 1e-5)
        assert_close(lse, expected_lse, 1e-5)


def test_stream_only_runs_under_jit_with_host_arrays():
    b, s, h, d = 1, 100, 2, 8
    q, k, v = random(20, b, h, d), random(21, b, s, h, d), random(22, b, s, h, d)
    p = small_plan("stream", s, 2 * b * h * d * 4, 20)
    cache = offload.OffloadedKV.build(k, v, p)
    step = jax.jit(offload.decode_attention_offloaded, static_argnames=("backend",))
    out = step(q, cache, jnp.array([97]), backend="cpu")
    assert_close(out, np_decode(q, k, v, np.array([97]))[0], 1e-5)
    text = jax.jit(lambda q, c: offload.decode_attention_offloaded(q, c, jnp.array([97]))).lower(q, cache).as_text()
    assert "pinned_host" in text                      # the blocks enter the jit as host-memory arguments


@pytest.mark.parametrize("strategy", ["stream", "both"])
def test_separate_stream_blocks_equal_single_cache(strategy):
    """Blocks as separate host arrays (each moved whole) give the same result."""
    b, s, hq, hkv, d = 1, 120, 4, 2, 8
    q, k, v = random(40, b, hq, d), random(41, b, s, hkv, d), random(42, b, s, hkv, d)
    p = small_plan("stream", s, 2 * b * hkv * d * 4, 24)
    if strategy == "both":
        p = dataclasses.replace(p, stream_tokens=60, cpu_tokens=36)
    cache = offload.OffloadedKV.build(k, v, p, stream_blocks="separate")
    assert isinstance(cache.stream_k, tuple) and cache.num_blocks == -(-p.stream_tokens // 16)
    assert all(block.sharding.memory_kind == "pinned_host" for block in cache.stream_k)
    lengths = jnp.array([111], jnp.int32)
    out, lse = offload.decode_attention_offloaded(q, cache, lengths, return_lse=True)
    expected, expected_lse = np_decode(q, k, v, lengths)
    assert_close(out, expected, 1e-5)
    assert_close(lse, expected_lse, 1e-5)
    with pytest.raises(ValueError, match="stream_blocks"):
        offload.OffloadedKV.build(k, v, p, stream_blocks="paged")


@pytest.mark.parametrize("strategy", ["stream", "both"])
def test_chunked_prefill_over_offloaded_cache(strategy):
    """Chunks attend over every cached position and causally over themselves;
    appended chunk by chunk, the cache then decodes as one array would."""
    b, hq, hkv, d, cached, chunk = 2, 4, 2, 8, 64, 12
    total = cached + 2 * chunk
    q_all, k_all, v_all = random(50, b, total, hq, d), random(51, b, total, hkv, d), random(52, b, total, hkv, d)
    p = small_plan("stream", cached, 2 * b * hkv * d * 4, 16)
    if strategy == "both":
        p = dataclasses.replace(p, stream_tokens=32, cpu_tokens=16)
    cache = offload.OffloadedKV.build(k_all[:, :cached], v_all[:, :cached], p,
                                      device_capacity=p.device_tokens + 2 * chunk + 1)
    lengths = jnp.array([cached, cached], jnp.int32)
    for start in (cached, cached + chunk):
        rows = slice(start, start + chunk)
        out, lse = offload.prefill_attention_offloaded(q_all[:, rows], k_all[:, rows], v_all[:, rows], cache,
                                                       lengths, backend="cpu", return_lse=True)
        keys = np.arange(start + chunk)
        visible = keys[None, :] <= np.arange(start, start + chunk)[:, None]          # causal over positions
        expected, expected_lse = np_attention(q_all[:, rows], k_all[:, :start + chunk], v_all[:, :start + chunk],
                                              visible[None, None], 1 / np.sqrt(d))
        assert_close(out, expected, 1e-5)
        assert_close(lse, expected_lse, 1e-5)
        cache = cache.append(k_all[:, rows], v_all[:, rows], lengths)
        lengths = lengths + chunk
    q = random(53, b, hq, d)
    assert_close(offload.decode_attention_offloaded(q, cache, lengths), np_decode(q, k_all, v_all, lengths)[0], 1e-5)


def test_split_refuses_tracing():
    b, s, h, d = 1, 40, 1, 8
    q, k, v = random(23, b, h, d), random(24, b, s, h, d), random(25, b, s, h, d)
    cache = offload.OffloadedKV.build(k, v, small_plan("split", s, 2 * h * d * 4, 10))
    with pytest.raises(ValueError, match="cpu part"):
        jax.jit(lambda q: offload.decode_attention_offloaded(q, cache, jnp.array([40])))(q)


def test_append_writes_the_device_part():
    b, s, h, d = 2, 64, 2, 8
    k, v = random(26, b, s + 2, h, d), random(27, b, s + 2, h, d)
    p = small_plan("both", s, 2 * b * h * d * 4, 16)
    cache = offload.OffloadedKV.build(k[:, :s], v[:, :s], p, device_capacity=p.device_tokens + 2)
    lengths = jnp.array([s, s], jnp.int32)
    for step in range(2):
        cache = cache.append(k[:, s + step], v[:, s + step], lengths)
        lengths = lengths + 1
    q = random(28, b, 2 * h, d)
    out = offload.decode_attention_offloaded(q, cache, lengths)
    assert_close(out, np_decode(q, k, v, lengths)[0], 1e-5)


def test_unsupported_memory_kind_names_argument():
    device = jax.devices()[0]
    with pytest.raises(ValueError, match="host_memory_kind='hbm2'"):
        offload.check_memory_kind(device, "hbm2")
    k = random(29, 1, 32, 1, 8)
    p = small_plan("stream", 32, 64, 8)
    with pytest.raises(ValueError, match="host_memory_kind"):
        offload.OffloadedKV.build(k, k, p, host_memory_kind="hbm2")


def test_greedy_decode_host_cache_equals_device_cache():
    """A tiny two-layer attention-only decoder, greedy, as generate() runs it:
    per step and layer, append the new K/V, then attend. The offloaded cache
    (stream + split) picks the same tokens and logits as one device cache."""
    vocab, dim, heads, kv_heads, head_dim, layers = 32, 16, 4, 2, 8, 2
    rng = np.random.default_rng(30)
    embed = jnp.asarray(rng.standard_normal((vocab, dim)), jnp.float32)
    weights = [{name: jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[0]), jnp.float32)
                for name, shape in (("wq", (dim, heads * head_dim)), ("wk", (dim, kv_heads * head_dim)),
                                    ("wv", (dim, kv_heads * head_dim)), ("wo", (heads * head_dim, dim)))}
               for _ in range(layers)]
    prompt_len, new_tokens, batch = 40, 6, 2
    context = prompt_len + new_tokens
    tokens = jnp.asarray(rng.integers(0, vocab, (batch, prompt_len)), jnp.int32)

    def project(x, w):
        return ((x @ w["wq"]).reshape(batch, heads, head_dim), (x @ w["wk"]).reshape(batch, kv_heads, head_dim),
                (x @ w["wv"]).reshape(batch, kv_heads, head_dim))

    # Prefill: keys and values of the prompt per layer, written position by position.
    def prefill():
        caches = [(np.zeros((batch, context, kv_heads, head_dim), np.float32),) * 2 for _ in range(layers)]
        caches = [(np.zeros_like(c[0]), np.zeros_like(c[1])) for c in caches]
        for pos in range(prompt_len):
            x = embed[tokens[:, pos]]
            for layer, w in enumerate(weights):
                q, k, v = project(x, w)
                caches[layer][0][:, pos], caches[layer][1][:, pos] = k, v
                out, _ = np_decode(q, caches[layer][0], caches[layer][1], np.full(batch, pos + 1))
                x = x + jnp.asarray(out.reshape(batch, -1), jnp.float32) @ w["wo"]
        return caches, x

    def generate(attend, caches, append, x):
        lengths, picked = jnp.full((batch,), prompt_len, jnp.int32), []
        for _ in range(new_tokens):
            token = jnp.argmax(x @ embed.T, axis=-1)
            picked.append(token)
            x = embed[token]
            for layer, w in enumerate(weights):
                q, k, v = project(x, w)
                caches[layer] = append(caches[layer], k, v, lengths)
                x = x + attend(q, caches[layer], lengths + 1).reshape(batch, -1) @ w["wo"]
            lengths = lengths + 1
        return jnp.stack(picked, 1), x

    full, x = prefill()
    device_caches = [(jnp.asarray(k), jnp.asarray(v)) for k, v in full]
    on_device = generate(
        lambda q, c, n: jnp.asarray(np_decode(q, c[0], c[1], n)[0], jnp.float32), device_caches,
        lambda c, k, v, n: (c[0].at[jnp.arange(batch), n].set(k), c[1].at[jnp.arange(batch), n].set(v)), x)
    bytes_per_token = 2 * batch * kv_heads * head_dim * 4
    p = dataclasses.replace(small_plan("stream", prompt_len, bytes_per_token, 8), stream_tokens=20, cpu_tokens=12,
                            block_tokens=8)
    host_caches = [offload.OffloadedKV.build(jnp.asarray(k[:, :prompt_len]), jnp.asarray(v[:, :prompt_len]), p,
                                             device_capacity=p.device_tokens + new_tokens) for k, v in full]
    offloaded = generate(lambda q, c, n: offload.decode_attention_offloaded(q, c, n, backend="einsum"),
                         host_caches, lambda c, k, v, n: c.append(k, v, n), x)
    np.testing.assert_array_equal(np.asarray(offloaded[0]), np.asarray(on_device[0]))
    np.testing.assert_allclose(np.asarray(offloaded[1]), np.asarray(on_device[1]), atol=1e-4)


# ----------------------------------------------------------------------------- planner

def test_plan_everything_fits_on_device():
    p = offload.plan(1000, kv_bytes_per_token=4096, device_kv_bytes=1 << 30, throughputs=THROUGHPUTS)
    assert (p.device_tokens, p.stream_tokens, p.cpu_tokens, p.strategy) == (1000, 0, 0, "device")


@pytest.mark.parametrize("pcie, cpu", [(50e9, 25e9), (25e9, 25e9), (50e9, 5e9)])
def test_plan_balances_pcie_against_cpu(pcie, cpu):
    """With no fixed CPU cost and a fast accelerator the best split has
    stream/cpu = P/C (equal finishing times)."""
    tp = offload.Throughputs(pcie, 1e15, cpu)
    context, per_token, device = 1 << 20, 4096, 1 << 18
    p = offload.plan(context, kv_bytes_per_token=per_token, device_kv_bytes=device * per_token, throughputs=tp,
                     grid=4096)
    host = context - device
    assert p.device_tokens == device and p.stream_tokens + p.cpu_tokens == host
    assert p.device_tokens % 1024 == 0 and p.cpu_tokens % 1024 == 0     # foldable into equal chunks
    assert p.stream_tokens / host == pytest.approx(pcie / (pcie + cpu), abs=2e-3)
    assert p.strategy == "stream+split"
    assert p.block_tokens * per_token / 2 >= 1 << 20
    assert p.layer_s < offload.plan(context, kv_bytes_per_token=per_token, device_kv_bytes=device * per_token,
                                    throughputs=tp, strategy="stream").layer_s


def test_plan_strategies_and_fixed_cost():
    kw = dict(kv_bytes_per_token=4096, device_kv_bytes=1 << 30, throughputs=THROUGHPUTS)
    context = 2 << 20
    assert offload.plan(context, strategy="stream", **kw).cpu_tokens == 0
    split = offload.plan(context, strategy="split", **kw)
    assert split.stream_tokens == 0 and split.strategy == "split"
    # A CPU whose fixed cost exceeds what it could save is not used.
    slow = dataclasses.replace(THROUGHPUTS, cpu_fixed_s=10.0)
    assert offload.plan(context, kv_bytes_per_token=4096, device_kv_bytes=1 << 30, throughputs=slow).cpu_tokens == 0
    no_cpu = dataclasses.replace(THROUGHPUTS, cpu_bytes_per_s=0.0)
    assert offload.plan(context, kv_bytes_per_token=4096, device_kv_bytes=1 << 30, throughputs=no_cpu).cpu_tokens == 0
    with pytest.raises(ValueError, match="cpu_bytes_per_s"):
        offload.plan(context, strategy="split", kv_bytes_per_token=4096, device_kv_bytes=1 << 30, throughputs=no_cpu)
    text = str(offload.plan(context, **kw))
    assert "stream" in text and "predicted" in text


def test_plan_bad_arguments():
    kw = dict(kv_bytes_per_token=4096, device_kv_bytes=1 << 30, throughputs=THROUGHPUTS)
    with pytest.raises(ValueError, match="host_kv_bytes"):
        offload.plan(1 << 20, host_kv_bytes=1 << 30, **kw)
    with pytest.raises(ValueError, match="strategy"):
        offload.plan(1 << 20, strategy="fast", **kw)
    with pytest.raises(ValueError, match="block_bytes"):
        offload.plan(1 << 20, block_bytes=4096, **kw)


def test_measure_throughputs_runs_here():
    tp = offload.measure_throughputs(kv_heads=2, head_dim=16, dtype=jnp.float32, copy_bytes=1 << 20,
                                     accelerator_tokens=1024, cpu_tokens=1024, repeats=1)
    assert tp.pcie_bytes_per_s > 0 and tp.accelerator_bytes_per_s > 0 and tp.cpu_bytes_per_s > 0
    assert tp.cpu_fixed_s >= 0
    assert "GB/s" in str(tp)


@pytest.mark.parametrize("backend", ["einsum", "cpu", "xla"])
def test_partial_ignores_garbage_past_the_length(backend):
    """Positions past a row's length may hold NaN: they never reach the
    result (a masked weight is 0, but 0 x NaN would be NaN)."""
    from jax_fastattn.offload.partial import partial_decode
    keys = jax.random.split(jax.random.PRNGKey(40), 3)
    q = jax.random.normal(keys[0], (2, 4, 8))
    k, v = (jax.random.normal(key, (2, 16, 2, 8)) for key in keys[1:])
    lengths = jnp.array([5, 16])
    past = jnp.arange(16)[None, :, None, None] >= lengths[:, None, None, None]
    dirty = [jnp.where(past, jnp.nan, x) for x in (k, v)]
    out, lse = partial_decode(q, *dirty, lengths, backend=backend)
    clean, clean_lse = partial_decode(q, k, v, lengths, backend=backend)
    np.testing.assert_allclose(np.asarray(out), np.asarray(clean), atol=1e-6)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(clean_lse), atol=1e-6)


@pytest.mark.parametrize("stream_blocks", ["stacked", "separate"])
def test_offload_benchmark_dry_run(tmp_path, stream_blocks):
    """tools/gpu/offload_bench.py end to end at toy sizes on this machine's
    CPU (the device run has no time to find a broken script): every strategy
    builds its caches in place, decodes, and reports its figures."""
    import json
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "offload.json"
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, os.path.join(root, "tools", "gpu", "offload_bench.py"), "--preset", "tiny",
                          "--stream-blocks", stream_blocks, "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    results = json.loads(out.read_text())
    assert not results["errors"]
    cases = {c["strategy"]: c for c in results["cases"]}
    assert set(cases) == {"split", "both", "stream"} and all(c["status"] == "ok" for c in cases.values())
    assert cases["stream"]["pcie_bytes_per_token"] > 0 and cases["stream"]["effective_pcie_bytes_per_s"] > 0
    assert cases["split"]["kv_bytes"]["cpu"] > 0 and cases["split"]["pcie_bytes_per_token"] == 0
    # "both" divides the host part as this machine's measured rates say (either side may come out empty).
    both = cases["both"]["plan_fields"]
    assert both["stream_tokens"] + both["cpu_tokens"] > 0
    for case in cases.values():
        plan = case["plan_fields"]
        assert (case["kv_bytes"]["stream"] > 0) == (plan["stream_tokens"] > 0)
        assert (case["kv_bytes"]["cpu"] > 0) == (plan["cpu_tokens"] > 0)
    assert all(c["stream_blocks"] == stream_blocks for c in cases.values())


@pytest.mark.parametrize("device_bytes", [0, (3 << 30) + 12345, 117_574_729_728 // 32])
def test_max_context_tokens_is_the_longest_context_plan_accepts(device_bytes):
    # The device part is rounded down to whole position quanta, so the
    # longest context is not (device + host bytes) / bytes per token.
    kw = dict(kv_bytes_per_token=4096, device_kv_bytes=device_bytes, host_kv_bytes=(88 << 30) // 32)
    longest = offload.max_context_tokens(**kw)
    assert longest <= (device_bytes + kw["host_kv_bytes"]) // 4096
    p = offload.plan(longest, throughputs=THROUGHPUTS, strategy="stream", **kw)
    assert p.device_tokens + p.stream_tokens + p.cpu_tokens == longest
    assert p.stream_tokens * 4096 <= kw["host_kv_bytes"]
    with pytest.raises(ValueError, match="host_kv_bytes allows"):
        offload.plan(longest + 1, throughputs=THROUGHPUTS, strategy="stream", **kw)
    with pytest.raises(ValueError, match="host_kv_bytes"):
        offload.max_context_tokens(kv_bytes_per_token=4096, device_kv_bytes=0, host_kv_bytes=-1)
