"""Decode of a Llama-3-8B-shaped model (32 layers, random bf16 weights, batch 1)
over a context whose KV cache does not fit on the GPU: part in device memory,
the rest in pinned host memory (strategy "stream") and/or attended by the CPU
(strategy "split"), as jax_fastattn.offload plans it.

    python tools/gpu/offload_bench.py --preset h200 --out $OUT/offload_h200.json
    python tools/gpu/offload_bench.py --preset tiny --out /tmp/offload_tiny.json   # CPU dry run

Measures in one process: a host->device copy from pinned_host (the PCIe
reference), the planner's throughputs (GPU and CPU decode attention), the
streaming mechanism alone (copy-only; stacked and separate host blocks), then for each
context ("1M" = 1,048,576 tokens; "max" = what device memory plus --host-gib of
host memory hold) and strategy: tokens/s of a whole decode step, the bytes that
crossed PCIe per token and the effective PCIe bandwidth (step alone and the
stream part's attention alone) next to the copy. The step runs the weight
GEMVs (RMSNorm, QKV, O, SwiGLU MLP, LM head; no RoPE, which moves no memory)
and attends over a context of fixed length: the new token's K/V is computed
but not appended (an O(1) write that does not change the timing).

Each case records its failure (out of memory, unsupported feature) and the
run goes on. Full size on an H200 (139 GiB HBM, 128 GiB host): about 4-5
minutes, most of it filling ~200 GiB of KV and compiling.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import math
import os
import platform
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")   # the device part needs most of HBM
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

from jax_fastattn import merge_partials, offload  # noqa: E402
from jax_fastattn.offload.cache import default_cpu_device  # noqa: E402

GiB = 1 << 30

# Llama-3-8B (HF config): hidden 4096, intermediate 14336, 32 layers, 32 query
# heads, 8 KV heads, head dim 128, vocab 128256. KV = 2 * 32 * 8 * 128 * 2 B =
# 128 KiB per token.
PRESETS = {
    "h200": dict(layers=32, hidden=4096, ffn=14336, q_heads=32, kv_heads=8, head_dim=128, vocab=128256,
                 contexts="1M,max", host_gib=88.0, device_reserve_gib=8.0, block_mib=16, steps=3,
                 probe_tokens=262144, cpu_probe_tokens=65536, copy_mib=1024),
    "tiny": dict(layers=2, hidden=128, ffn=256, q_heads=4, kv_heads=2, head_dim=64, vocab=512,
                 contexts="32768", host_gib=0.25, device_kv_mib=8, device_reserve_gib=0.0, block_mib=1,
                 steps=2, probe_tokens=8192, cpu_probe_tokens=8192, copy_mib=16),
}


def parse_tokens(text):
    text = text.strip().lower()
    if text == "max":
        return "max"
    scale = {"k": 1 << 10, "m": 1 << 20}.get(text[-1], 1)
    return int(float(text.rstrip("km")) * scale)


def host_info():
    info = {"cpu_count": os.cpu_count(), "python": sys.version.split()[0], "jax": jax.__version__,
            "platform": platform.platform()}
    try:
        info["cpus_usable"] = len(os.sched_getaffinity(0))   # what the CPU kernel's thread pool can use
    except AttributeError:
        info["cpus_usable"] = os.cpu_count()
    try:
        with open("/proc/meminfo") as f:
            info["meminfo"] = {line.split(":")[0]: line.split(":")[1].strip() for line in f
                               if line.startswith(("MemTotal", "MemAvailable"))}
    except OSError:
        pass
    device = jax.devices()[0]
    info["device"] = str(device)
    info["device_kind"] = getattr(device, "device_kind", "")
    info["memory_kinds"] = offload.cache.memory_kinds(device)
    stats = device.memory_stats() or {}
    info["device_bytes_limit"] = stats.get("bytes_limit")
    return info


def best_time(fn, repeats):
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def measure_copy(device, nbytes, repeats=5):
    """Host->device bandwidth of one device_put from pinned_host (and back)."""
    on_host = SingleDeviceSharding(device, memory_kind="pinned_host")
    on_device = SingleDeviceSharding(device, memory_kind="device")
    source = jax.device_put(jnp.zeros((nbytes // 2,), jnp.bfloat16), on_host)
    h2d = nbytes / best_time(lambda: jax.device_put(source, on_device), repeats)
    resident = jax.device_put(source, on_device)
    d2h = nbytes / best_time(lambda: jax.device_put(resident, on_host), repeats)
    return {"h2d_bytes_per_s": h2d, "d2h_bytes_per_s": d2h, "bytes": nbytes}


def measure_stream_mechanism(device, cfg, block_tokens, num_blocks, layout="stacked", repeats=3):
    """The double-buffered stream of offload with no attention: each step copies
    block i+1 and reduces a slice of block i (so the copy is not dead code).
    layout "stacked": one [num_blocks, ...] host array sliced inside a scan;
    "separate": one host array per block, in an unrolled loop (as
    OffloadedKV's stream_blocks)."""
    on_host = SingleDeviceSharding(device, memory_kind="pinned_host")
    shape = (num_blocks, 1, block_tokens, cfg["kv_heads"], cfg["head_dim"])
    to_device = lambda x: jax.device_put(x, jax.memory.Space.Device)  # noqa: E731
    touch = lambda block: jnp.sum(block[:, :8].astype(jnp.float32))  # noqa: E731
    if layout == "stacked":
        blocks = jax.device_put(jnp.ones(shape, jnp.bfloat16), on_host)
        nbytes = blocks.nbytes

        @jax.jit
        def stream(blocks):
            fetch = lambda i: to_device(jax.lax.dynamic_index_in_dim(blocks, i, keepdims=False))  # noqa: E731

            def step(carry, i):
                block, total = carry
                return (fetch(i + 1), total + touch(block)), None

            (last, total), _ = jax.lax.scan(step, (fetch(0), jnp.float32(0)), jnp.arange(num_blocks - 1))
            return total + touch(last)
    else:
        blocks = [jax.device_put(jnp.ones(shape[1:], jnp.bfloat16), on_host) for _ in range(num_blocks)]
        nbytes = sum(block.nbytes for block in blocks)

        @jax.jit
        def stream(blocks):
            current, total = to_device(blocks[0]), jnp.float32(0)
            for nxt in blocks[1:]:
                fetched = to_device(nxt)
                total, current = total + touch(current), fetched
            return total + touch(current)

    seconds = best_time(lambda: stream(blocks), repeats)
    return {"layout": layout, "bytes": nbytes, "seconds": seconds, "bytes_per_s": nbytes / seconds,
            "block_bytes": nbytes // num_blocks}


# --------------------------------------------------------------------------- the model's step

def init_weights(cfg, device, seed=0):
    """Per-layer random bf16 weights on the device (lists, so each layer's jit
    takes its own arrays)."""
    h, f, hd = cfg["hidden"], cfg["ffn"], cfg["head_dim"]
    qkv = (cfg["q_heads"] + 2 * cfg["kv_heads"]) * hd
    shapes = {"wqkv": (h, qkv), "wo": (cfg["q_heads"] * hd, h), "w13": (h, 2 * f), "w2": (f, h)}
    key = jax.random.key(seed)

    @jax.jit
    def make(key):
        keys = jax.random.split(key, len(shapes))
        return {name: (jax.random.normal(k, shape, jnp.float32) / math.sqrt(shape[0])).astype(jnp.bfloat16)
                for k, (name, shape) in zip(keys, shapes.items())}

    layers = [jax.device_put(make(jax.random.fold_in(key, i)), device) for i in range(cfg["layers"])]
    head_key = jax.random.fold_in(key, 10_000)
    lm_head = jax.device_put(
        (jax.random.normal(head_key, (h, cfg["vocab"]), jnp.float32) / math.sqrt(h)).astype(jnp.bfloat16), device)
    embed = jax.device_put(jax.random.normal(head_key, (cfg["vocab"], h), jnp.bfloat16), device)
    return layers, lm_head, embed


def rms_norm(x):
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-5)).astype(x.dtype)


def make_layer_fns(cfg, scale, backend):
    hq, hd = cfg["q_heads"], cfg["head_dim"]

    def project(x, w):
        qkv = rms_norm(x) @ w["wqkv"]
        q = qkv[:, :hq * hd].reshape(-1, hq, hd)
        return q, qkv[:, hq * hd:]               # k/v of the new token: computed, not appended

    def finish(x, attn, w):
        x = x + attn.reshape(x.shape[0], -1).astype(x.dtype) @ w["wo"]
        gate_up = rms_norm(x) @ w["w13"]
        gate, up = jnp.split(gate_up, 2, axis=-1)
        return x + (jax.nn.silu(gate) * up) @ w["w2"]

    @jax.jit
    def fused_layer(x, w, cache, lengths):
        """Stream / device-only layer: projection, attention, MLP in one jit."""
        q, _ = project(x, w)
        out, _ = offload.accelerator_partial(q, cache, lengths, scale=scale, backend=backend)
        return finish(x, out, w)

    pre = jax.jit(lambda x, w: project(x, w)[0])
    post = jax.jit(lambda x, acc, cpu, w: finish(x, merge_partials([acc[0], cpu[0]],
                                                                           [acc[1], cpu[1]])[0], w))
    accel = jax.jit(lambda q, cache, lengths: offload.accelerator_partial(q, cache, lengths, scale=scale,
                                                                         backend=backend))
    return fused_layer, pre, accel, post


def decode_step(x, weights, caches, lengths, fns, scale, cpu_backend, device):
    """One token through all layers; returns the next token's embedding input."""
    fused_layer, pre, accel, post = fns
    for w, cache in zip(weights, caches):
        if cache.cpu_k is None:
            x = fused_layer(x, w, cache, lengths)
        else:
            q = pre(x, w)
            cpu = offload.cpu_partial(q, cache, lengths, scale=scale, backend=cpu_backend)   # CPU starts first
            acc = accel(q, cache, lengths)
            x = post(x, acc, jax.device_put(cpu, device), w)
    return x


# --------------------------------------------------------------------------- building caches

def random_kv(key, shape, device, memory_kind="device"):
    """Random bf16 values made by the device and written where they live
    (device memory, or `pinned_host` through the jit's output sharding; a
    backend that cannot write a jit's output to host memory gets a copy)."""
    try:
        return _random_fn(shape, device, memory_kind)(key)
    except jax.errors.JaxRuntimeError:
        if memory_kind == "device":
            raise
        made = _random_fn(shape, device, "device")(key)
        return jax.device_put(made, SingleDeviceSharding(device, memory_kind=memory_kind))


@functools.lru_cache(maxsize=None)
def _random_fn(shape, device, memory_kind):
    return jax.jit(lambda k: jax.random.normal(k, shape, jnp.bfloat16),
                   out_shardings=SingleDeviceSharding(device, memory_kind=memory_kind))


@functools.lru_cache(maxsize=None)
def _tiled_fn(shape, tile, cpu_device):
    """[B, S, Hkv, D] on the CPU device: one random tile of `tile` positions
    repeated (only bytes and their placement matter to the timing; moving
    76 GiB of device-made values to the CPU device took minutes)."""
    b, seq, hkv, hd = shape

    def make(key):
        block = jax.random.normal(key, (b, tile, hkv, hd), jnp.bfloat16)
        return jnp.tile(block, (1, -(-seq // tile), 1, 1))[:, :seq]

    return jax.jit(make, out_shardings=SingleDeviceSharding(cpu_device))


def build_caches(cfg, plan, device, cpu_device, seed, stream_blocks):
    """Per layer, each part made in place: stream blocks written straight to
    pinned host memory, the cpu part on the CPU device, the device part in
    device memory. Random bf16 values."""
    b, hkv, hd = 1, cfg["kv_heads"], cfg["head_dim"]
    block = plan.block_tokens
    caches = []
    for layer in range(cfg["layers"]):
        key = jax.random.fold_in(jax.random.key(seed), layer)
        keys = jax.random.split(key, 6)
        stream_k = stream_v = cpu_k = cpu_v = None
        if plan.stream_tokens:
            num_blocks = plan.stream_capacity // block
            if stream_blocks == "separate":
                stream_k, stream_v = (tuple(random_kv(jax.random.fold_in(keys[i], n), (b, block, hkv, hd), device,
                                                      "pinned_host") for n in range(num_blocks)) for i in (0, 1))
            else:
                stream_k, stream_v = (random_kv(keys[i], (num_blocks, b, block, hkv, hd), device, "pinned_host")
                                      for i in (0, 1))
        if plan.cpu_tokens:
            tiled = _tiled_fn((b, plan.cpu_tokens, hkv, hd), min(block, plan.cpu_tokens), cpu_device)
            cpu_k, cpu_v = (tiled(jax.device_put(keys[i], cpu_device)) for i in (2, 3))
        device_k, device_v = (random_kv(keys[i], (b, plan.device_tokens, hkv, hd), device) for i in (4, 5))
        caches.append(offload.OffloadedKV(device_k, device_v, stream_k, stream_v, cpu_k, cpu_v,
                                          plan.stream_tokens or None))
    jax.block_until_ready(caches)
    return caches


# --------------------------------------------------------------------------- cases

def run_case(cfg, args, context, strategy, throughputs, weights, lm_head, embed, device, cpu_device, copy):
    record = {"context_tokens": context, "strategy": strategy, "stream_blocks": args.stream_blocks}
    caches = None
    try:
        per_token = 2 * cfg["kv_heads"] * cfg["head_dim"] * 2          # K+V bytes of one layer, bf16, B=1
        p = offload.plan(context, kv_bytes_per_token=per_token, device_kv_bytes=args.device_kv_bytes_per_layer,
                         host_kv_bytes=int(args.host_gib * GiB / cfg["layers"]), throughputs=throughputs,
                         strategy=strategy, block_bytes=cfg["block_mib"] << 20)
        print(f"  {p}", flush=True)
        record.update(plan=str(p), plan_fields=dataclasses.asdict(p), predicted_token_s=p.layer_s * cfg["layers"])
        start = time.perf_counter()
        caches = build_caches(cfg, p, device, cpu_device, seed=context % 997, stream_blocks=args.stream_blocks)
        record["build_s"] = time.perf_counter() - start
        record["kv_bytes"] = {part: sum(c.nbytes()[part] for c in caches) for part in ("device", "stream", "cpu")}
        scale = 1.0 / math.sqrt(cfg["head_dim"])
        fns = make_layer_fns(cfg, scale, args.backend)
        lengths = jax.device_put(jnp.array([context], jnp.int32), device)
        x = jax.device_put(embed[:1], device)
        # Greedy next token. The tables are arguments, not closed-over
        # constants: jit would otherwise embed their 2 GiB in the program.
        head = jax.jit(lambda x, embed, lm_head: embed[jnp.argmax(rms_norm(x) @ lm_head, axis=-1)])

        def step(x):
            return head(decode_step(x, weights, caches, lengths, fns, scale, args.cpu_backend, device), embed,
                        lm_head)

        start = time.perf_counter()
        x = jax.block_until_ready(step(x))
        record["first_step_s"] = time.perf_counter() - start             # includes compilation
        times = []
        for _ in range(cfg["steps"]):
            start = time.perf_counter()
            x = jax.block_until_ready(step(x))
            times.append(time.perf_counter() - start)
        step_s = float(np.median(times))
        pcie = p.pcie_bytes * cfg["layers"]
        record.update(step_s=step_s, step_times_s=times, tokens_per_s=1.0 / step_s, pcie_bytes_per_token=pcie,
                      effective_pcie_bytes_per_s=pcie / step_s if pcie else None)
        if pcie:
            record["effective_pcie_vs_copy"] = pcie / step_s / copy["h2d_bytes_per_s"]
            # The stream part's attention alone (one layer, nothing else): the copy engine's share.
            only_stream = dataclasses.replace(caches[0], device_k=caches[0].device_k[:, :0],
                                              device_v=caches[0].device_v[:, :0], cpu_k=None, cpu_v=None)
            q = jnp.zeros((1, cfg["q_heads"], cfg["head_dim"]), jnp.bfloat16)
            stream_lengths = jnp.array([p.stream_tokens], jnp.int32)
            seconds = best_time(lambda: offload.accelerator_partial(q, only_stream, stream_lengths, scale=scale,
                                                                    backend=args.backend), 3)
            record["stream_attention_bytes_per_s"] = p.pcie_bytes / seconds
            record["stream_attention_vs_copy"] = p.pcie_bytes / seconds / copy["h2d_bytes_per_s"]
        record["status"] = "ok"
    except Exception as error:     # noqa: BLE001  (a failed case is a result; the run goes on)
        record.update(status="failed", error=f"{type(error).__name__}: {error}"[:2000],
                      traceback=traceback.format_exc()[-3000:])
        print(f"  FAILED {record['error'][:300]}", flush=True)
    finally:
        caches = None      # frees the case's device and host KV before the next case
        gc.collect()
    return record


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--out", required=True, help="JSON results path")
    parser.add_argument("--contexts", help="comma list of token counts (1M, 512K, 300000) or 'max'")
    parser.add_argument("--strategies", default="split,both,stream",
                        help="per context, from stream,split,both,auto, run in this order (split first: pinned "
                        "host memory, once taken by the host allocator, is kept by it for later cases, while "
                        "the CPU part's memory returns to the system)")
    parser.add_argument("--split-contexts", default="1M", help="contexts at which strategies other than "
                        "stream run (host memory holds one layout at a time)")
    parser.add_argument("--host-gib", type=float, help="host memory for KV, pinned + CPU part (GiB)")
    parser.add_argument("--backend", default=None, help="accelerator attention: einsum, decode or a "
                        "flash_attention backend (default: the fastest of einsum, auto and decode, measured)")
    parser.add_argument("--cpu-backend", default="decode:cpu", help="the cpu part's attention (offload.partial)")
    parser.add_argument("--stream-blocks", choices=["stacked", "separate"], default="stacked",
                        help="host block layout (OffloadedKV.from_parts); a failed stacked case is retried "
                        "with separate blocks, which are then kept")
    parser.add_argument("--steps", type=int)
    args = parser.parse_args(argv)
    cfg = dict(PRESETS[args.preset])
    cfg["steps"] = args.steps or cfg["steps"]
    args.host_gib = args.host_gib if args.host_gib is not None else cfg["host_gib"]
    # XLA's pinned host allocator stops at 64 GB unless told otherwise; set
    # before the first device use creates the GPU client.
    os.environ.setdefault("XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB", str(int(math.ceil(args.host_gib)) + 8))
    contexts = [parse_tokens(c) for c in (args.contexts or cfg["contexts"]).split(",")]
    split_contexts = {parse_tokens(c) for c in args.split_contexts.split(",")} if args.preset != "tiny" \
        else set(contexts)
    strategies = args.strategies.split(",")
    results = {"preset": args.preset, "config": cfg, "host": host_info(), "cases": [], "errors": []}
    print(json.dumps(results["host"]), flush=True)
    device = jax.devices()[0]
    cpu_device = default_cpu_device(device)
    results["host"]["cpu_device"] = str(cpu_device)

    def save():
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)

    def attempt(name, fn):
        try:
            value = fn()
            results[name] = value
            print(f"{name}: {value}", flush=True)
            return value
        except Exception as error:  # noqa: BLE001
            results["errors"].append({"what": name, "error": f"{type(error).__name__}: {error}"[:2000],
                                      "traceback": traceback.format_exc()[-3000:]})
            print(f"{name} FAILED: {error}"[:400], flush=True)
            return None
        finally:
            save()

    copy = attempt("copy", lambda: measure_copy(device, cfg["copy_mib"] << 20))
    block_tokens = (cfg["block_mib"] << 20) // (cfg["kv_heads"] * cfg["head_dim"] * 2)
    mechanism_blocks = max(2, (cfg["copy_mib"] << 20) // (block_tokens * cfg["kv_heads"] * cfg["head_dim"] * 2))
    for layout in ("stacked", "separate"):
        attempt(f"stream_mechanism_{layout}", lambda: measure_stream_mechanism(
            device, cfg, block_tokens, mechanism_blocks, layout))
    candidates = [args.backend] if args.backend else ["einsum", "auto", "decode"]
    measured = {}
    for backend in candidates:
        tp = attempt(f"throughputs_{backend}", lambda: offload.measure_throughputs(
            kv_heads=cfg["kv_heads"], head_dim=cfg["head_dim"], q_heads=cfg["q_heads"], dtype=jnp.bfloat16,
            device=device, cpu_device=cpu_device, copy_bytes=cfg["copy_mib"] << 20,
            accelerator_tokens=cfg["probe_tokens"], cpu_tokens=cfg["cpu_probe_tokens"], backend=backend,
            cpu_backend=args.cpu_backend))
        if tp is not None:
            measured[backend] = tp
            results[f"throughputs_{backend}"] = dataclasses.asdict(tp)
    if not measured and args.cpu_backend != "einsum":
        print("retrying the throughputs with cpu_backend='einsum'", flush=True)
        args.cpu_backend = "einsum"
        for backend in candidates:
            tp = attempt(f"throughputs_{backend}_cpu_einsum", lambda: offload.measure_throughputs(
                kv_heads=cfg["kv_heads"], head_dim=cfg["head_dim"], q_heads=cfg["q_heads"], dtype=jnp.bfloat16,
                device=device, cpu_device=cpu_device, copy_bytes=cfg["copy_mib"] << 20,
                accelerator_tokens=cfg["probe_tokens"], cpu_tokens=cfg["cpu_probe_tokens"], backend=backend,
                cpu_backend="einsum"))
            if tp is not None:
                measured[backend] = tp
    results["cpu_backend"] = args.cpu_backend
    if not measured or copy is None:
        save()
        print("no throughputs / copy measured; stopping")
        return 1
    args.backend = max(measured, key=lambda b: measured[b].accelerator_bytes_per_s)
    throughputs = measured[args.backend]
    results["accelerator_backend"] = args.backend
    print(f"throughputs ({args.backend}): {throughputs}", flush=True)

    weights, lm_head, embed = init_weights(cfg, device)
    weight_bytes = sum(x.nbytes for w in weights for x in w.values()) + lm_head.nbytes + embed.nbytes
    stats = device.memory_stats() or {}
    limit = stats.get("bytes_limit")
    if "device_kv_mib" in cfg or not limit:
        device_kv = cfg.get("device_kv_mib", 1024) << 20
    else:
        device_kv = limit - stats.get("bytes_in_use", weight_bytes) - int(cfg["device_reserve_gib"] * GiB)
    args.device_kv_bytes_per_layer = max(0, device_kv // cfg["layers"])
    per_token = 2 * cfg["kv_heads"] * cfg["head_dim"] * 2
    results.update(weight_bytes=weight_bytes, device_kv_bytes=device_kv, kv_bytes_per_token_all_layers=
                   per_token * cfg["layers"])
    max_context = offload.max_context_tokens(kv_bytes_per_token=per_token,
                                             device_kv_bytes=args.device_kv_bytes_per_layer,
                                             host_kv_bytes=int(args.host_gib * GiB / cfg["layers"]))
    print(f"weights {weight_bytes / GiB:.1f} GiB; KV on device {device_kv / GiB:.1f} GiB, host {args.host_gib} GiB:"
          f" longest context {max_context:,} tokens", flush=True)
    for context in contexts:
        context = max_context if context == "max" else context
        for strategy in (strategies if context in split_contexts else ["stream"]):
            print(f"context {context:,} strategy {strategy}", flush=True)
            case = run_case(cfg, args, context, strategy, throughputs, weights, lm_head, embed, device,
                            cpu_device, copy)
            if case["status"] != "ok" and args.stream_blocks == "stacked" and case.get("plan_fields", {}).get(
                    "stream_tokens"):
                results["cases"].append(case)
                print("  retrying with separate host blocks", flush=True)
                args.stream_blocks = "separate"
                case = run_case(cfg, args, context, strategy, throughputs, weights, lm_head, embed, device,
                                cpu_device, copy)
            results["cases"].append(case)
            save()
    by_key = {(c["context_tokens"], c["strategy"]): c for c in results["cases"] if c.get("status") == "ok"}
    for (context, strategy), case in by_key.items():
        if strategy != "stream" and (context, "stream") in by_key:
            case["speedup_vs_stream"] = by_key[(context, "stream")]["step_s"] / case["step_s"]
    save()
    print(f"\n{'context':>10} {'strategy':>9} {'plan':>14} {'tok/s':>8} {'PCIe GB/tok':>11} {'eff GB/s':>9} "
          f"{'vs copy':>8} {'stream-only':>11} {'vs stream':>9}")
    for c in results["cases"]:
        if c.get("status") != "ok":
            print(f"{c['context_tokens']:>10,} {c['strategy']:>9} FAILED {c.get('error', '')[:80]}")
            continue
        eff = c.get("effective_pcie_bytes_per_s")
        print(f"{c['context_tokens']:>10,} {c['strategy']:>9} {c['plan_fields'] and c['plan'].split(']')[0][6:]:>14}"
              f" {c['tokens_per_s']:>8.3f} {c['pcie_bytes_per_token'] / 1e9:>11.2f} "
              f"{(eff or 0) / 1e9:>9.1f} {c.get('effective_pcie_vs_copy', 0):>8.2f} "
              f"{c.get('stream_attention_vs_copy', 0):>11.2f} {c.get('speedup_vs_stream', 1.0):>9.2f}")
    print(f"copy h2d {copy['h2d_bytes_per_s'] / 1e9:.1f} GB/s; cpus usable {results['host']['cpus_usable']}")
    return 0 if all(c.get("status") == "ok" for c in results["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
