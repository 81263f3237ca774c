"""flash_attention under jit with NamedSharding inputs, shard_map, and both
partitioners, on 8 host CPU devices (conftest sets the device count)."""
import contextlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_fastattn import flash_attention, masks, sharding
from helpers import assert_close, random_qkv

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 host devices")

MESHES = [(8, 1), (2, 4), (1, 8)]


def make_mesh(shape):
    return Mesh(np.array(jax.devices()[:8]).reshape(shape), ("batch", "heads"))


@contextlib.contextmanager
def partitioner(shardy: bool):
    old = jax.config.jax_use_shardy_partitioner
    jax.config.update("jax_use_shardy_partitioner", shardy)
    try:
        yield
    finally:
        jax.config.update("jax_use_shardy_partitioner", old)


def shard(mesh, x, spec):
    return jax.device_put(x, NamedSharding(mesh, spec))


QKV_SPEC = P("batch", None, "heads", None)
COLLECTIVES = re.compile(r"\b(all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter)\b")


def collectives(hlo: str):
    return sorted(set(COLLECTIVES.findall(hlo)))


@pytest.mark.parametrize("shardy", [True, False], ids=["shardy", "gspmd"])
@pytest.mark.parametrize("mesh_shape", MESHES)
def test_batch_and_head_sharding_forward_and_grad_without_communication(mesh_shape, shardy):
    mesh = make_mesh(mesh_shape)
    q, k, v = random_qkv(0, 8, 40, 56, 8, 8, 16)
    q_ids = jnp.asarray(np.sort(np.random.default_rng(1).integers(0, 3, (8, 40)), axis=1), jnp.int32)
    kv_ids = jnp.asarray(np.sort(np.random.default_rng(2).integers(0, 3, (8, 56)), axis=1), jnp.int32)
    bias = jax.random.normal(jax.random.PRNGKey(3), (8, 8, 40, 56))

    def loss(q, k, v, bias, q_ids, kv_ids):
        out = flash_attention(q, k, v, bias=bias, mask=masks.Segments(q_ids, kv_ids) & masks.Causal(),
                              backend="cpu")
        return jnp.sum(out ** 2), out

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
    with partitioner(shardy):
        args = (shard(mesh, q, QKV_SPEC), shard(mesh, k, QKV_SPEC), shard(mesh, v, QKV_SPEC),
                shard(mesh, bias, P("batch", "heads", None, None)),
                shard(mesh, q_ids, P("batch", None)), shard(mesh, kv_ids, P("batch", None)))
        compiled = fn.lower(*args).compile()
        (value, out), grads = compiled(*args)
        hlo = compiled.as_text()
    (ref_value, ref_out), ref_grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True))(
        q, k, v, bias, q_ids, kv_ids)
    assert_close(out, ref_out, jnp.float32)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, jnp.float32, tolerance=1e-4)
    # The loss itself is a sum over shards (one all-reduce of a scalar);
    # nothing else may move: no gather of q/k/v, no resharding.
    assert not {"all-gather", "all-to-all", "collective-permute"} & set(collectives(hlo)), collectives(hlo)
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, QKV_SPEC), 4)
    assert grads[1].sharding.is_equivalent_to(NamedSharding(mesh, QKV_SPEC), 4)


def test_per_device_buffers_are_one_eighth_under_2x4_mesh():
    mesh = make_mesh((2, 4))
    q, k, v = random_qkv(4, 8, 64, 64, 8, 8, 32)
    fn = jax.jit(lambda q, k, v: flash_attention(q, k, v, causal=True, backend="cpu"))
    args = [shard(mesh, x, QKV_SPEC) for x in (q, k, v)]
    compiled = fn.lower(*args).compile()
    hlo = compiled.as_text()
    # The kernel's custom call runs on the local [8/2, 64, 8/4, 32] blocks.
    call = [line for line in hlo.splitlines() if "fastattn_forward_cpu" in line]
    assert call and all("f32[4,64,2,32]" in line for line in call), call
    assert "f32[8,64,8,32]" not in "\n".join(call)
    for x in compiled(*args), *args:
        assert {s.data.shape for s in x.addressable_shards} == {(4, 64, 2, 32)}
    memory = compiled.memory_analysis()
    full_bytes = 4 * q.size * 4  # q, k, v, out unsharded
    per_device = memory.argument_size_in_bytes + memory.output_size_in_bytes
    assert per_device <= full_bytes / 8 + 1024, (per_device, full_bytes)


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["gqa-4", "gqa-2", "mqa"])
def test_gqa_with_head_axis_larger_than_kv_heads(kv_heads):
    """Head axis of 8 devices, fewer kv heads: resharded, never wrong."""
    mesh = make_mesh((1, 8))
    q, k, v = random_qkv(5, 2, 33, 47, 8, kv_heads, 16)
    loss = lambda q, k, v: jnp.sum(flash_attention(q, k, v, causal=True, backend="cpu") ** 2)
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    args = (shard(mesh, q, P(None, None, "heads", None)), shard(mesh, k, P()), shard(mesh, v, P()))
    value, grads = fn(*args)
    ref_value, ref_grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)
    assert_close(value, ref_value, jnp.float32)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, jnp.float32, tolerance=1e-4)


@pytest.mark.parametrize("shardy", [True, False], ids=["shardy", "gspmd"])
def test_sharded_sequence_axes_are_gathered_not_wrong(shardy):
    mesh = make_mesh((1, 8))
    q, k, v = random_qkv(6, 2, 64, 64, 4, 2, 16)
    fn = jax.jit(lambda q, k, v: flash_attention(q, k, v, causal=True, backend="cpu"))
    seq = P(None, "heads", None, None)  # sequence axis over 8 devices
    with partitioner(shardy):
        out = fn(shard(mesh, q, seq), shard(mesh, k, seq), shard(mesh, v, seq))
    assert_close(out, flash_attention(q, k, v, causal=True, backend="reference"), jnp.float32)


@pytest.mark.parametrize("backend", ["cpu", "xla"])
def test_shard_map_over_batch_and_heads(backend):
    """Inside shard_map the kernels and the pure-JAX backend (whose loop
    carries must vary over the manual axes as its inputs do) run per shard."""
    shard_map = jax.shard_map
    mesh = make_mesh((2, 4))
    q, k, v = random_qkv(7, 4, 30, 30, 8, 4, 16)

    def local(q, k, v):
        return flash_attention(q, k, v, causal=True, backend=backend)

    fn = jax.jit(shard_map(local, mesh=mesh, in_specs=(QKV_SPEC,) * 3, out_specs=QKV_SPEC))
    out = fn(q, k, v)
    assert_close(out, flash_attention(q, k, v, causal=True, backend="reference"), jnp.float32)
    grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2), (0, 1, 2)))(q, k, v)
    ref = jax.grad(lambda q, k, v: jnp.sum(flash_attention(q, k, v, causal=True, backend="reference") ** 2),
                   (0, 1, 2))(q, k, v)
    for g, r in zip(grads, ref):
        assert_close(g, r, jnp.float32, tolerance=1e-4)


def test_vmap_inside_sharded_jit():
    """The vmapped axis unsharded, the batch axis inside it sharded."""
    mesh = make_mesh((2, 4))
    q, k, v = random_qkv(8, 8, 20, 20, 2, 2, 8)
    split = lambda x: x.reshape(2, 4, *x.shape[1:])
    fn = jax.jit(jax.vmap(lambda q, k, v: flash_attention(q, k, v, causal=True, backend="cpu")))
    args = [jax.device_put(split(x), NamedSharding(mesh, P(None, "batch"))) for x in (q, k, v)]
    out = fn(*args)
    assert_close(out.reshape(q.shape), flash_attention(q, k, v, causal=True, backend="reference"), jnp.float32)


def test_rule_functions_directly():
    """The partition callbacks are trivial functions; test them without XLA."""
    mesh = make_mesh((2, 4))
    sh = NamedSharding(mesh, QKV_SPEC)
    assert sharding.choose_axes(mesh, sh, batch=8, kv_heads=8) == ("batch", "heads")
    assert sharding.choose_axes(mesh, sh, batch=8, kv_heads=2) == ("batch", None)
    assert sharding.choose_axes(mesh, sh, batch=3, kv_heads=8) == (None, "heads")

    class T:
        def __init__(self, shape):
            self.shape = shape
    rule = sharding.sharding_rule(sharding.FORWARD_ARGS, ("out", "lse"),
                                  [T((8, 5, 8, 4)), T((8, 6, 2, 4)), T((8, 6, 2, 4)), T((1, 8, 5, 6)),
                                   T((0,)), T((0,)), T((0,)), T((1, 1, 1, 1))],
                                  [T((8, 5, 8, 4)), T((8, 8, 5))])
    assert rule.factor_sizes == {"g": 4}
    assert rule.operand_mappings[0][2] == ("k", "g")  # q heads: kv-head major
    assert "t" in rule.need_replication_factors and "g" in rule.need_replication_factors
    # The broadcast bias [1, 8, 5, 6]: its batch dim gets a factor of its own, its heads q's.
    assert rule.operand_mappings[3][0] not in ("b",) and rule.operand_mappings[3][1] == ("k", "g")


def test_layouts_are_written_once_and_name_every_argument():
    """Every argument and result of every call has its own layout string, and
    the Shardy factors and the PartitionSpec both come from it."""
    names = set(sharding.FORWARD_ARGS + sharding.BACKWARD_ARGS + sharding.DECODE_ARGS
                + sharding.DECODE_PAGED_ARGS)
    names |= {"out", "lse", "work_counter", "d_q", "d_k", "d_v", "d_bias", "delta", "decode_out",
              "split_partials"}
    assert names <= set(sharding.LAYOUTS)
    for name, layout in sharding.LAYOUTS.items():
        dims = sharding._parse(layout)
        assert " ".join("(" + " ".join(d) + ")" if len(d) > 1 else d[0] for d in dims) == layout
    mesh = make_mesh((2, 4))
    spec = sharding._spec_for("q", (8, 5, 8, 4), 8, 8, "batch", "heads")
    assert spec == P("batch", None, "heads", None)
    assert sharding._spec_for("k_pages", (30, 16, 8, 4), 8, 8, "batch", "heads") == P(None, None, "heads", None)
    assert sharding._spec_for("bias", (1, 8, 5, 6), 8, 8, "batch", "heads") == P(None, "heads", None, None)
    assert sharding._spec_for("tile_class", (8, 1, 2, 2), 8, 8, "batch", "heads") == P("batch", None, None, None)
    assert mesh is not None


def test_cuda_forward_declares_a_work_counter_per_shard():
    """The CUDA forward's third result (the wgmma kernel's work counter,
    [B, Hq, 1] int32) is laid out per batch and q head, so that every
    shard's call gets its own; the public call drops it. Traced only: no
    CUDA needed."""
    from jax_fastattn import ffi
    attrs = ffi.CallAttrs(0.1, -(2**62), 0, 64, 64)
    q = jax.ShapeDtypeStruct((2, 100, 8, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 90, 2, 128), jnp.bfloat16)
    args = (q, kv, kv, ffi.absent(), ffi.absent(jnp.int32), ffi.absent(jnp.int32),
            ffi.absent(jnp.bool_), jnp.zeros((1, 1, 2, 2), jnp.int8))
    raw = jax.eval_shape(ffi.forward_ffi("cuda", attrs), *args)
    assert [(r.shape, r.dtype) for r in raw[2:]] == [((2, 8, 1), jnp.int32)]
    public = jax.eval_shape(sharding.forward_call("cuda", attrs), *args)
    assert [r.shape for r in public] == [(2, 100, 8, 128), (2, 8, 100)]
    assert len(jax.eval_shape(ffi.forward_ffi("cpu", attrs), *args)) == 2

    class T:
        def __init__(self, shape):
            self.shape = shape
    rule = sharding.sharding_rule(sharding.FORWARD_ARGS, ("out", "lse", "work_counter"),
                                  [T(a.shape) for a in args],
                                  [T(r.shape) for r in raw])
    # Batch and the q heads (kv-major compound), as out and lse: one counter per shard.
    assert rule.result_mappings[2][:2] == (rule.result_mappings[1][0], rule.result_mappings[1][1])
