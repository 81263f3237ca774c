"""Every kernel choice of config.KernelConfig on the device: for each
cuda_forward / cuda_backward choice, flash_attention's forward and its
gradients (bf16, head dim 64 and 128, no mask and causal GQA) equal a plain
float32 JAX reference; "auto" gives bitwise the result of the kernel it
should pick (wgmma on sm90 for head dim 64/128, else mma.sync); a request
that cannot be honoured (wgmma at head dim 256, wgmma off sm90, a wgmma
backward with a bias gradient) raises an error naming the option; each
volta_layout runs where the Volta kernel is built.

    python tools/gpu/kernel_config_check.py --size full --out $OUT/kernel_config.json
    python tools/gpu/kernel_config_check.py --size tiny --out /tmp/kc.json   # CPU dry run

Without a GPU it runs the default config on backend="cpu" and checks that
a CUDA kernel choice there raises: a check of the script, not of the
kernels. Writes one JSON record per case (status pass / fail, errors,
timings) and prints a table; exits 1 if any case failed. Full size on an
H100/H200: well under two minutes, mostly compilation.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from jax_fastattn import flash_attention
from jax_fastattn.config import KernelConfig
from jax_fastattn import ffi

SIZES = {"tiny": dict(batch=1, seq=128, q_heads=4), "full": dict(batch=2, seq=2048, q_heads=8)}
# Largest difference allowed, relative to the reference's largest magnitude
# (bf16 inputs and outputs: 8 mantissa bits, sums in float32).
OUT_TOLERANCE = 2e-2
GRAD_TOLERANCE = 4e-2


def reference(q, k, v, causal, bias=None):
    """Plain float32 softmax attention, [B, S, H, D], kv heads shared by
    groups of q heads; written here, independent of the library."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if causal:
        sq, skv = q.shape[1], k.shape[1]
        visible = jnp.arange(skv)[None, :] <= jnp.arange(sq)[:, None] + (skv - sq)
        logits = jnp.where(visible, logits, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


def inputs(size, dim, kv_heads, dtype, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    b, s, hq = size["batch"], size["seq"], size["q_heads"]
    q = jax.random.normal(keys[0], (b, s, hq, dim), dtype)
    k = jax.random.normal(keys[1], (b, s, kv_heads, dim), dtype)
    v = jax.random.normal(keys[2], (b, s, kv_heads, dim), dtype)
    cotangent = jax.random.normal(keys[3], (b, s, hq, dim), jnp.float32)
    return q, k, v, cotangent


def relative_error(value, expected):
    value, expected = np.asarray(value, np.float32), np.asarray(expected, np.float32)
    if not np.isfinite(value).all():
        return float("inf")
    return float(np.max(np.abs(value - expected)) / max(np.max(np.abs(expected)), 1e-6))


def run_attention(backend, config, q, k, v, causal, cotangent, grads=True, bias=None):
    """flash_attention's output and (q, k, v[, bias]) gradients of
    sum(out * cotangent), as numpy arrays."""
    def loss(q, k, v, bias):
        out = flash_attention(q, k, v, causal=causal, bias=bias, backend=backend, config=config)
        return jnp.sum(out.astype(jnp.float32) * cotangent), out

    if not grads:
        out = jax.jit(lambda q, k, v: flash_attention(q, k, v, causal=causal, bias=bias, backend=backend,
                                                      config=config))(q, k, v)
        return [np.asarray(out)]
    argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
    (_, out), g = jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))(q, k, v, bias)
    return [np.asarray(out)] + [np.asarray(x) for x in g]


def reference_results(q, k, v, causal, cotangent):
    def loss(q, k, v):
        out = reference(q, k, v, causal)
        return jnp.sum(out * cotangent), out

    (_, out), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return [np.asarray(out)] + [np.asarray(x) for x in g]


def device_is_sm90():
    device = jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")) == "9.0"


def correctness_cases(on_gpu, size):
    """(name, backend, config, dim, kv_heads, causal) of every matching case."""
    backend = "cuda" if on_gpu else "cpu"
    # "wgmma_ordered": the wgmma forward with the ordered one-pass backward.
    choices = ("auto", "wgmma", "wgmma_ordered", "mma_sync") if on_gpu else ("auto",)
    for dim in (64, 128):
        for causal, kv_heads in ((False, size["q_heads"]), (True, size["q_heads"] // 2)):
            for choice in choices:
                forward = "wgmma" if choice == "wgmma_ordered" else choice
                config = KernelConfig(cuda_forward=forward, cuda_backward=choice) if on_gpu else None
                name = f"{backend} fwd+bwd={choice} D={dim} {'causal GQA' if causal else 'full MHA'}"
                yield name, backend, config, dim, kv_heads, causal


def check_correctness(case, size, results):
    name, backend, config, dim, kv_heads, causal = case
    q, k, v, cot = inputs(size, dim, kv_heads, jnp.bfloat16)
    expected = reference_results(q, k, v, causal, cot)
    start = time.perf_counter()
    got = run_attention(backend, config, q, k, v, causal, cot)
    errors = [relative_error(a, b) for a, b in zip(got, expected)]
    ok = errors[0] <= OUT_TOLERANCE and max(errors[1:]) <= GRAD_TOLERANCE
    results[name] = got
    return dict(status="pass" if ok else "fail", out_error=errors[0], dq_error=errors[1], dk_error=errors[2],
                dv_error=errors[3], seconds=time.perf_counter() - start)


def check_auto_is_bitwise(on_gpu, results):
    """auto must give bitwise the results of the kernels it should pick (on
    sm90 the wgmma forward and the ordered one-pass backward)."""
    if not on_gpu:
        return []
    picked = "wgmma_ordered" if device_is_sm90() else "mma_sync"
    records = []
    for name in [n for n in results if "fwd+bwd=auto" in n]:
        other = name.replace("fwd+bwd=auto", f"fwd+bwd={picked}")
        if other not in results:
            continue
        same = all(np.array_equal(a, b) for a, b in zip(results[name], results[other]))
        records.append(dict(case=f"{name} == {picked}", status="pass" if same else "fail"))
    return records


def impossible_cases(on_gpu, size):
    """(name, thunk, option) of every request that must raise naming `option`."""
    hq = size["q_heads"]
    q, k, v, cot = inputs(size, 64, hq, jnp.bfloat16)
    if not on_gpu:
        yield ("cpu with cuda_forward=wgmma", lambda: run_attention(
            "cpu", KernelConfig(cuda_forward="wgmma"), q, k, v, False, cot, grads=False), "cuda_forward")
        return
    q256, k256, v256, _ = inputs(size, 256, hq, jnp.bfloat16)
    yield ("cuda fwd=wgmma D=256", lambda: run_attention(
        "cuda", KernelConfig(cuda_forward="wgmma"), q256, k256, v256, False, cot, grads=False), "cuda_forward")
    bias = jnp.zeros((1, hq, size["seq"], size["seq"]), jnp.float32)
    yield ("cuda bwd=wgmma with a bias gradient", lambda: run_attention(
        "cuda", KernelConfig(cuda_backward="wgmma"), q, k, v, False, cot, bias=bias), "cuda_backward")
    if not device_is_sm90():
        yield ("cuda fwd=wgmma off sm90", lambda: run_attention(
            "cuda", KernelConfig(cuda_forward="wgmma"), q, k, v, False, cot, grads=False), "cuda_forward")
        yield ("cuda bwd=wgmma off sm90", lambda: run_attention(
            "cuda", KernelConfig(cuda_backward="wgmma"), q, k, v, False, cot), "cuda_backward")


def check_raises(thunk, option):
    try:
        thunk()
    except Exception as error:  # noqa: BLE001 - an FFI error arrives as JaxRuntimeError
        message = f"{type(error).__name__}: {error}"
        return dict(status="pass" if option in message else "fail", error=message[:400])
    return dict(status="fail", error="no error raised")


def extra_gpu_cases(size):
    """Cases that must run: head dim 256 forward under auto (mma.sync), the
    bias gradient under auto, each Volta layout where built."""
    hq = size["q_heads"]
    q, k, v, cot = inputs(size, 256, hq, jnp.bfloat16)
    yield "cuda fwd=auto D=256", lambda: relative_error(
        run_attention("cuda", KernelConfig(), q, k, v, True, cot, grads=False)[0], reference(q, k, v, True))
    q, k, v, cot = inputs(size, 64, hq, jnp.bfloat16)
    bias = jax.random.normal(jax.random.PRNGKey(5), (1, hq, size["seq"], size["seq"]), jnp.float32)
    yield "cuda fwd=auto with bias D=64", lambda: relative_error(
        run_attention("cuda", KernelConfig(), q, k, v, False, cot, bias=bias)[0],
        reference(q, k, v, False, bias))
    if "fastattn_forward_volta" in ffi.cuda_targets():
        for layout in ("swizzled", "naive"):
            for dim in (64, 128):
                q, k, v, cot = inputs(size, dim, hq, jnp.float16)
                yield f"volta fwd layout={layout} D={dim}", (lambda layout=layout, q=q, k=k, v=v, cot=cot: relative_error(
                    run_attention("volta", KernelConfig(volta_layout=layout), q, k, v, True, cot, grads=False)[0],
                    reference(q, k, v, True)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--out", required=True, help="JSON results path")
    args = parser.parse_args(argv)
    size = SIZES[args.size]
    on_gpu = jax.devices()[0].platform == "gpu"
    device = jax.devices()[0]
    report = dict(device=getattr(device, "device_kind", str(device)), platform=device.platform,
                  compute_capability=str(getattr(device, "compute_capability", "")), jax=jax.__version__,
                  python=platform.python_version(), size=size, cuda_targets=sorted(ffi.cuda_targets()), cases=[])
    results = {}
    for case in correctness_cases(on_gpu, size):
        try:
            record = check_correctness(case, size, results)
        except Exception:  # noqa: BLE001 - record and go on
            record = dict(status="fail", error=traceback.format_exc()[-1500:])
        report["cases"].append(dict(case=case[0], **record))
    report["cases"] += check_auto_is_bitwise(on_gpu, results)
    for name, thunk, option in impossible_cases(on_gpu, size):
        report["cases"].append(dict(case=f"{name} raises naming {option}", **check_raises(thunk, option)))
    if on_gpu:
        for name, thunk in extra_gpu_cases(size):
            try:
                error = thunk()
                record = dict(status="pass" if error <= OUT_TOLERANCE else "fail", out_error=error)
            except Exception:  # noqa: BLE001
                record = dict(status="fail", error=traceback.format_exc()[-1500:])
            report["cases"].append(dict(case=name, **record))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"{report['device']} (cc {report['compute_capability']}), jax {report['jax']}, size {size}")
    for record in report["cases"]:
        figures = " ".join(f"{key}={record[key]:.2e}" for key in ("out_error", "dq_error", "dk_error", "dv_error")
                           if key in record)
        print(f"{record['status']:4}  {record['case']:55}  {figures}")
        if record["status"] != "pass" and "error" in record:
            print("      " + record["error"].strip().splitlines()[-1][:300])
    failed = sum(r["status"] != "pass" for r in report["cases"])
    print(f"{len(report['cases']) - failed} passed, {failed} failed -> {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
