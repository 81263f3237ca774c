"""Implementations called from JAX: ours, jax.nn (XLA, cuDNN), Pallas,
tokamax and the plain reference, and the worker that times one of them.

Forward + backward of every implementation is the same function:
`jax.vjp` of the forward applied to a preallocated output cotangent,
returning (dq, dk, dv), which is what torch's `autograd.grad` computes.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from jax_fastattn.bench import timing
from jax_fastattn.bench.cases import Case, make_inputs, probe


# Our sm90 backward variants, timed beside the default (on sm90 the
# ordered one-pass backward, "wgmma_ordered").
CUDA_BACKWARD_VARIANTS = {"fastattn-cuda-two-pass": "wgmma", "fastattn-cuda-ordered": "wgmma_ordered",
                          "fastattn-cuda-atomic": "wgmma_atomic"}


def _ours(name: str):
    """(backend, config) of our implementations. fastattn-cuda-sm80 is the
    cuda backend with the sm80 (mma.sync) kernels that A100/L40/RTX GPUs
    run, timed on whatever GPU this is."""
    from jax_fastattn.config import KernelConfig
    if name == "fastattn-cuda-sm80":
        return "cuda", KernelConfig(cuda_forward="mma_sync", cuda_backward="mma_sync")
    if name in CUDA_BACKWARD_VARIANTS:
        return "cuda", KernelConfig(cuda_backward=CUDA_BACKWARD_VARIANTS[name])
    return name.split("-", 1)[1], None


def attention_fn(name: str, case: Case) -> Callable:
    """attend(q, k, v) -> out [B, S, Hq, D] of implementation `name`."""
    import jax
    import jax.numpy as jnp

    import jax_fastattn

    if name.startswith("fastattn-") or name == "reference":
        backend, config = _ours(name) if name != "reference" else ("reference", None)
        extra = {} if config is None else {"config": config}
        return lambda q, k, v: jax_fastattn.flash_attention(q, k, v, causal=case.causal, backend=backend, **extra)
    if name.startswith("jax.nn-"):
        implementation = name.split("-", 1)[1]
        # jax.nn takes GQA k/v directly.
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=case.causal,
                                                            implementation=implementation)
    if name == "tokamax":
        import tokamax  # Google's Pallas kernel library; "mosaic" = its Mosaic-GPU kernel

        return lambda q, k, v: tokamax.dot_product_attention(q, k, v, is_causal=case.causal,
                                                             implementation="mosaic")
    if name == "pallas-mha":
        from jax.experimental.pallas.ops.gpu.attention import mha

        def attend(q, k, v):  # the Pallas op has no GQA: K/V heads are repeated
            group = q.shape[2] // k.shape[2]
            k, v = (jnp.repeat(x, group, axis=2) for x in (k, v))
            return mha(q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=case.causal)
        return attend
    raise ValueError(f"unknown JAX implementation {name!r}")


def build(name: str, case: Case) -> Callable:
    """The jitted function the worker times: attend(q, k, v) for "fwd",
    (q, k, v, dout) -> (dq, dk, dv) for "fwd_bwd"."""
    import jax
    attend = attention_fn(name, case)
    if case.mode == "fwd":
        return jax.jit(attend)
    if case.mode == "fwd_bwd":
        return jax.jit(lambda q, k, v, dout: jax.vjp(attend, q, k, v)[1](dout))
    raise ValueError(f"build takes fwd or fwd_bwd cases, got mode {case.mode!r}")


def build_decode(name: str) -> Callable:
    """fn(q [B, Hq, D], k, v, lengths) for decode peers."""
    import jax

    from jax_fastattn import decode_attention

    if name == "fastattn-cuda-simt":     # the CUDA-core decode kernel ("fastattn-cuda": the default choice)
        from jax_fastattn.config import KernelConfig
        simt = KernelConfig(cuda_decode="simt")
        return jax.jit(lambda q, k, v, n: decode_attention(q, k, v, n, backend="cuda", config=simt))
    if name.startswith("fastattn-"):
        backend = name.split("-", 1)[1]
        return jax.jit(lambda q, k, v, n: decode_attention(q, k, v, n, backend=backend))
    if name.startswith("jax.nn-"):
        implementation = name.split("-", 1)[1]
        return jax.jit(lambda q, k, v, n: jax.nn.dot_product_attention(
            q[:, None], k, v, key_value_seq_lengths=n, implementation=implementation)[:, 0])
    raise ValueError(f"unknown decode implementation {name!r}")


def _xla_flops(compiled) -> float:
    """XLA's own FLOP count of the compiled function (custom calls count 0)."""
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost.get("flops", 0.0))
    except Exception:  # not every backend reports it
        return 0.0


def prepare(name: str, case: Case, host: dict):
    """(compiled, args): implementation `name` compiled ahead of time for
    the case's inputs `host` (numpy, from make_inputs), which it returns on
    the device; `compiled(*args)` is the timed call."""
    import jax
    import jax.numpy as jnp

    names = ("q", "k", "v", "lengths") if case.mode == "decode" else ("q", "k", "v", "dout")
    args = tuple(jnp.asarray(host[n]) for n in names if n in host)
    jax.block_until_ready(args)
    fn = build_decode(name) if case.mode == "decode" else build(name, case)
    return fn.lower(*args).compile(), args


def probe_of(case: Case, result) -> list:
    """The case's probe of one call's result (the output; dq and dv of a
    forward + backward)."""
    return probe(case, result[0], result[2]) if case.mode == "fwd_bwd" else probe(case, result)


def run(name: str, case: Case, repeats: int, inputs_dir: Optional[str] = None) -> dict:
    """Times implementation `name` on `case` in this process (inputs from
    make_inputs(case, inputs_dir))."""
    import jax

    compiled, args = prepare(name, case, make_inputs(case, inputs_dir))
    # Peak memory of running (not compiling): growth of the peak RSS over the
    # resident set once inputs and the executable exist. Outputs count.
    baseline = timing.status_mb("VmRSS") if timing.reset_peak_rss() else timing.peak_rss_mb()
    result = jax.block_until_ready(compiled(*args))  # warm-up; its output is the probe
    gpu = jax.devices()[0].platform == "gpu"
    calls = timing.GPU_CALLS_PER_SAMPLE if gpu else 1
    times, median = timing.sample_seconds(lambda: compiled(*args), jax.block_until_ready, repeats, calls)
    temp_mb = None
    try:
        temp_mb = compiled.memory_analysis().temp_size_in_bytes / 2**20
    except Exception:  # not every backend reports it
        pass
    values = probe_of(case, result)
    return {"impl": name, "case": dataclasses.asdict(case), "times_s": times, "median_s": median,
            "calls_per_sample": calls, "tflops": case.flops / median / 1e12, "gbps": case.kv_bytes / median / 1e9,
            "peak_mb": timing.peak_rss_mb() - baseline, "xla_temp_mb": temp_mb,
            "xla_flops": _xla_flops(compiled), "probe": values,
            "device": str(jax.devices()[0].device_kind), "versions": versions(name)}


def versions(name: str) -> dict:
    import jax
    found = {"jax": jax.__version__}
    if name == "tokamax":
        import importlib.metadata
        found["tokamax"] = importlib.metadata.version("tokamax")
    return found
