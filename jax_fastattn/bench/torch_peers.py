"""Implementations called from torch: on a GPU, torch SDPA pinned to one
backend (FlashAttention-2, cuDNN) and FlashAttention-4 (CuTe DSL; on sm90
its FlashAttention-3 design); on the CPU, torch SDPA pinned to its fused
flash-attention CPU kernel (`torch-sdpa-cpu`; AMX tiles for bf16 where the
CPU has them). All are timed by the same method as the JAX ones.

Forward + backward is `torch.autograd.grad(out, (q, k, v), dout)` with a
preallocated cotangent: nothing accumulates into `.grad` (which would add
three read-modify-writes per step that the JAX peers do not do).
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import os
from typing import Callable, Optional, Tuple

from jax_fastattn.bench import timing
from jax_fastattn.bench.cases import Case, make_inputs, probe

SDPA_BACKENDS = {"torch-flash": "FLASH_ATTENTION", "torch-cudnn": "CUDNN_ATTENTION",
                 "torch-sdpa-cpu": "FLASH_ATTENTION"}
CPU_IMPLS = {"torch-sdpa-cpu"}
TORCH_IMPLS = set(SDPA_BACKENDS) | {"fa4"}


def heads_first(name: str) -> bool:
    """Whether the implementation's own layout is [B, H, S, D] (torch SDPA)
    rather than [B, S, H, D]: its inputs are made contiguous in it."""
    return name in SDPA_BACKENDS


def attention_fn(name: str, case: Case) -> Callable:
    """attend(q, k, v) -> out, torch tensors in the implementation's own
    layout (heads_first)."""
    import torch

    if name in SDPA_BACKENDS:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = getattr(SDPBackend, SDPA_BACKENDS[name])
        gqa = case.heads != case.kv_heads

        def attend(q, k, v):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=case.causal,
                                                                        enable_gqa=gqa)
        return attend
    if name == "fa4":
        from flash_attn.cute import flash_attn_func  # takes [B, S, H, D] and GQA k/v

        def attend(q, k, v):
            out = flash_attn_func(q, k, v, causal=case.causal)
            return out[0] if isinstance(out, tuple) else out  # (out, lse) in 4.0 betas
        return attend
    raise ValueError(f"unknown torch implementation {name!r}")


def step_fn(attend: Callable, q, k, v, dout=None) -> Callable:
    """The timed step: attend(q, k, v), or with a cotangent `dout` its
    forward + backward returning (dq, dk, dv) via autograd.grad."""
    import torch
    if dout is None:
        return lambda: attend(q, k, v)

    def step():
        out = attend(q, k, v)
        return torch.autograd.grad(out, (q, k, v), grad_outputs=dout)
    return step


def prepare(name: str, case: Case, host: dict) -> Tuple[Callable, Callable]:
    """(step, probe_of): the timed step of implementation `name` on the
    case's inputs `host` (numpy, from make_inputs) placed on its device,
    and the function that turns a step's result into the case's probe."""
    import torch

    if case.mode not in ("fwd", "fwd_bwd"):
        raise ValueError(f"torch peers take fwd or fwd_bwd cases, got mode {case.mode!r}")
    device = "cpu" if name in CPU_IMPLS else "cuda"
    grad = case.mode == "fwd_bwd"
    # [B, S, H, D] <-> the implementation's layout (a transpose is its own inverse).
    own_layout = (lambda t: t.transpose(1, 2)) if heads_first(name) else (lambda t: t)

    def to_device(x, requires_grad):
        # numpy has no bfloat16 of its own: through float32, cast on the device.
        t = own_layout(torch.from_numpy(x.astype("float32"))).contiguous()
        return t.to(device, getattr(torch, case.dtype)).requires_grad_(requires_grad)

    q, k, v = (to_device(host[n], grad) for n in ("q", "k", "v"))
    dout = to_device(host["dout"], False) if grad else None
    step = step_fn(attention_fn(name, case), q, k, v, dout)
    as_bshd = lambda t: own_layout(t).detach().float().cpu()

    def probe_of(result):
        return probe(case, as_bshd(result[0]), as_bshd(result[2])) if grad else probe(case, as_bshd(result))
    return step, probe_of


def wait_fn(name: str) -> Callable:
    """Waits for the device's queued work: a CUDA sync, nothing on the CPU
    (a torch CPU op returns when it is done)."""
    if name in CPU_IMPLS:
        return lambda _: None
    import torch
    return lambda _: torch.cuda.synchronize()


def versions(name: str) -> dict:
    import torch
    found = {"torch": torch.__version__}
    if name == "fa4":
        found["flash-attn-4"] = importlib.metadata.version("flash-attn-4")
    return found


def run(name: str, case: Case, repeats: int, inputs_dir: Optional[str] = None) -> dict:
    # Nothing here uses JAX's GPU client, but should anything start it in
    # this process it must not take 75 % of the memory torch needs.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import torch

    step, probe_of = prepare(name, case, make_inputs(case, inputs_dir))
    wait = wait_fn(name)
    calls = 1 if name in CPU_IMPLS else timing.GPU_CALLS_PER_SAMPLE
    result = step()  # warm-up; its output is the probe
    wait(None)
    times, median = timing.sample_seconds(step, wait, repeats, calls)
    device = "cpu" if name in CPU_IMPLS else torch.cuda.get_device_name()
    return {"impl": name, "case": dataclasses.asdict(case), "times_s": times, "median_s": median,
            "calls_per_sample": calls, "tflops": case.flops / median / 1e12, "gbps": 0.0,
            "peak_mb": 0.0, "probe": probe_of(result), "device": device, "versions": versions(name)}
