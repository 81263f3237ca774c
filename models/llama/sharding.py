"""pjit sharding of the Llama model on a mesh with axes ("data", "model").

Megatron-style tensor parallelism: attention heads and the MLP's hidden width
split over "model" (q/k/v kernels column-wise, the output projections
row-wise, so each block ends in one all-reduce), batch over "data". The KV
cache [B, L, Smax, Hkv, D] splits B over "data" and Hkv over "model", the same
way as the attention kernels' own sharding rules split q/k/v, so the fused
calls need no gathers. A head count that "model" does not divide stays
replicated (as MaxText does for kv heads).
"""
from __future__ import annotations

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "model")
ACTIVATIONS = P("data", None, None)      # [B, S, d_model]
TOKEN_ACTIVATIONS = P("data", None)      # [B, d_model]
CP_AXIS = "cp"
CP_ACTIVATIONS = P(None, CP_AXIS, None)  # [B, S, d_model], sequence over "cp" (context parallelism)
REPLICATED = P()


def check_mesh(mesh, batch: int) -> None:
    if mesh is None:
        return
    if not isinstance(mesh, Mesh) or tuple(mesh.axis_names) != AXES:
        raise ValueError(f"mesh must be a jax.sharding.Mesh with axis names {AXES}, got "
                         f"{getattr(mesh, 'axis_names', type(mesh).__name__)}")
    if batch % mesh.shape["data"]:
        raise ValueError(f"batch ({batch}) must be a multiple of the mesh's 'data' axis ({mesh.shape['data']})")


def make_mesh(shape: str) -> Mesh:
    """'2x4' -> Mesh of (data=2, model=4) over the first 8 devices."""
    try:
        data, model = (int(n) for n in shape.lower().split("x"))
    except ValueError:
        raise ValueError(f"mesh must look like DATAxMODEL, e.g. '2x4', got {shape!r}") from None
    if data * model > jax.device_count():
        raise ValueError(f"mesh {shape} needs {data * model} devices, {jax.device_count()} available")
    return jax.make_mesh((data, model), AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=jax.devices()[:data * model])


def make_cp_mesh(num_devices: int) -> Mesh:
    """Mesh of one axis "cp" over the first num_devices devices, for the
    context-parallel prefill (the sequence split over them)."""
    if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 1:
        raise ValueError(f"context_parallel must be an int >= 1, got {num_devices!r}")
    if num_devices > jax.device_count():
        raise ValueError(f"context_parallel={num_devices} needs {num_devices} devices, {jax.device_count()} available")
    return jax.make_mesh((num_devices,), (CP_AXIS,), axis_types=(AxisType.Auto,), devices=jax.devices()[:num_devices])


def axis_size(mesh, name: str) -> int:
    return 1 if mesh is None else mesh.shape[name]


def _split(n: int, mesh):
    """'model' if it divides n, else None (replicated)."""
    return "model" if n % axis_size(mesh, "model") == 0 else None


def constrain(x, mesh, spec):
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def heads_spec(num_heads: int, mesh) -> P:
    """[B, S, H, D] activations."""
    return P("data", None, _split(num_heads, mesh), None)


def cache_spec(cfg, mesh) -> P:
    """[B, L, Smax, Hkv, D] cache."""
    return P("data", None, None, _split(cfg.num_key_value_heads, mesh), None)


def param_spec(path: tuple, shape: tuple, cfg, mesh) -> P:
    """The PartitionSpec of one parameter from its path of names. A leading
    layer axis (stacked layer storage) is replicated; per-layer storage has
    none, which the parameter's rank tells."""
    # Dict keys only: a Variable's own attribute (".value") is not a name.
    names = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
    q, kv, ffn = _split(cfg.num_attention_heads, mesh), _split(cfg.num_key_value_heads, mesh), \
        _split(cfg.intermediate_size, mesh)
    if "query" in names:
        spec = (None, q, None)
    elif "key" in names or "value" in names:
        spec = (None, kv, None)
    elif "out" in names:
        spec = (q, None, None)
    elif "gate_proj" in names or "up_proj" in names:
        spec = (None, ffn)
    elif "down_proj" in names:
        spec = (ffn, None)
    elif "lm_head" in names:
        spec = (None, _split(cfg.vocab_size, mesh))
    else:
        return P(*([None] * len(shape)))  # embeddings, norms: replicated
    return P(*([None] * (len(shape) - len(spec))), *spec)


def param_shardings(state, cfg, mesh):
    """A NamedSharding per leaf of an nnx.State of the Llama model."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, param_spec(path, x.shape, cfg, mesh)), state)
