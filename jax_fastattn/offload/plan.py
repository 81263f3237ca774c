"""The planner: where each position of a long KV cache lives, chosen from
measured PCIe bandwidth and the accelerator's and CPU's attention throughput.

Model (per layer and decode step; b = KV bytes of one position, all batch
rows, K and V; G, P, C = accelerator attention, host->device copy and CPU
attention throughputs in bytes/s; d, s, c = device, streamed and
CPU-attended positions, d + s + c = context):

    accelerator  t_acc = max((d + s) * b / G,  s * b / P + min(s, block) * b / G)
    cpu          t_cpu = c * b / C + t_fixed          (0 when c = 0)
    layer        t     = max(t_acc, t_cpu)

The three engines (compute units, copy engine, CPU) run at once: double
buffering hides the copies behind attention until PCIe is the slower of the
two, leaving only the last block's attention after its copy; t_fixed is the
CPU part's per-call cost (moving q and the partial, dispatch). d is as many
positions as device_kv_bytes holds (device memory is the fastest tier); the
host positions are split between s and c to minimise t, which balances
s*b/P against c*b/C (s/c ~ P/C when t_fixed is small): with P = 50 GB/s and
C = 25 GB/s two thirds stream and one third stays with the CPU.
Bandwidth-bound decode makes bytes the right unit: attention reads each
cached byte once per step.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from .cache import check_memory_kind, default_cpu_device
from .partial import partial_decode_jit

STRATEGIES = ("auto", "stream", "split", "both")
GiB = 1 << 30
# Device and CPU parts are whole multiples of this many positions, so that a
# kernel can fold a part's keys into equal chunks with a free reshape.
POSITION_QUANTUM = 1024


@dataclasses.dataclass(frozen=True)
class Throughputs:
    """Measured rates in bytes/s (attention: cached KV bytes read per second)."""
    pcie_bytes_per_s: float
    accelerator_bytes_per_s: float
    cpu_bytes_per_s: float
    cpu_fixed_s: float = 0.0

    def __str__(self):
        return (f"host->device {self.pcie_bytes_per_s / 1e9:.1f} GB/s, accelerator attention "
                f"{self.accelerator_bytes_per_s / 1e9:.1f} GB/s, CPU attention {self.cpu_bytes_per_s / 1e9:.1f} "
                f"GB/s + {self.cpu_fixed_s * 1e3:.2f} ms per call")


@dataclasses.dataclass(frozen=True)
class Plan:
    context_tokens: int
    device_tokens: int
    stream_tokens: int
    cpu_tokens: int
    block_tokens: int
    kv_bytes_per_token: int
    accelerator_s: float
    cpu_s: float

    @property
    def stream_capacity(self) -> int:
        """Stream positions rounded up to whole blocks (the tail is masked)."""
        return -(-self.stream_tokens // self.block_tokens) * self.block_tokens if self.stream_tokens else 0

    @property
    def strategy(self) -> str:
        parts = [name for name, n in (("stream", self.stream_tokens), ("split", self.cpu_tokens)) if n]
        return "+".join(parts) or "device"

    @property
    def layer_s(self) -> float:
        return max(self.accelerator_s, self.cpu_s)

    @property
    def pcie_bytes(self) -> int:
        """Bytes that cross PCIe per layer and step (whole blocks)."""
        return self.stream_capacity * self.kv_bytes_per_token

    def __str__(self):
        b = self.kv_bytes_per_token
        block_mib = self.block_tokens * b / 2 / 2**20
        return (f"plan [{self.strategy}]: {self.context_tokens:,} positions = device {self.device_tokens:,} "
                f"({self.device_tokens * b / GiB:.2f} GiB) + stream {self.stream_tokens:,} "
                f"({self.stream_capacity // self.block_tokens if self.stream_tokens else 0} blocks of "
                f"{self.block_tokens:,}, {block_mib:.1f} MiB per K or V block) + cpu {self.cpu_tokens:,} "
                f"({self.cpu_tokens * b / GiB:.2f} GiB); predicted {self.layer_s * 1e3:.3f} ms per layer "
                f"(accelerator {self.accelerator_s * 1e3:.3f}, cpu {self.cpu_s * 1e3:.3f})")


def predict(device_tokens: int, stream_tokens: int, cpu_tokens: int, block_tokens: int, kv_bytes_per_token: int,
            tp: Throughputs):
    """(accelerator seconds, cpu seconds) per layer under the module's model."""
    b = kv_bytes_per_token
    accelerator = (device_tokens + stream_tokens) * b / tp.accelerator_bytes_per_s
    if stream_tokens:
        last_block = min(stream_tokens, block_tokens) * b / tp.accelerator_bytes_per_s
        copy = stream_tokens * b / tp.pcie_bytes_per_s + last_block
        accelerator = max(accelerator, copy)
    cpu = cpu_tokens * b / tp.cpu_bytes_per_s + tp.cpu_fixed_s if cpu_tokens else 0.0
    return accelerator, cpu


def plan(context_tokens: int, *, kv_bytes_per_token: int, device_kv_bytes: int, throughputs: Throughputs,
         host_kv_bytes: Optional[int] = None, strategy: str = "auto", block_bytes: int = 16 << 20,
         grid: int = 1024, position_quantum: int = POSITION_QUANTUM) -> Plan:
    """Chooses device, stream and cpu positions for one layer's cache.

    Args:
      context_tokens: positions to hold (prompt plus room to generate).
      kv_bytes_per_token: K+V bytes of one position of one layer, all batch
        rows (Llama-3-8B, bf16, B=1: 2 * 8 heads * 128 * 2 = 4096).
      device_kv_bytes: device memory this layer's cache may use.
      host_kv_bytes: host memory it may use (None: unbounded).
      throughputs: measured rates (`measure_throughputs`).
      strategy: "stream" (no CPU part), "split" (no streaming: the CPU
        attends over the whole host part), "both" or "auto" (the model's best
        mix of the two; either may come out empty).
      block_bytes: bytes of one streamed K (or V) block, >= 1 MiB so a copy
        runs at DMA speed (vLLM measured 4-5x from 0.5 MB blocks over
        8-72 KB ones).
      position_quantum: device and cpu parts are whole multiples of it.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if context_tokens < 0 or kv_bytes_per_token <= 0 or device_kv_bytes < 0:
        raise ValueError(f"context_tokens, device_kv_bytes must be >= 0 and kv_bytes_per_token > 0, got "
                         f"{context_tokens}, {device_kv_bytes}, {kv_bytes_per_token}")
    if block_bytes < 1 << 20:
        raise ValueError(f"block_bytes must be >= 1 MiB (1048576) so that blocks cross PCIe at DMA speed, got "
                         f"{block_bytes}")
    b = kv_bytes_per_token
    block_tokens = max(1, math.ceil(block_bytes / (b / 2)))
    if position_quantum < 1:
        raise ValueError(f"position_quantum must be >= 1, got {position_quantum}")
    device_tokens = min(context_tokens, device_kv_bytes // b // position_quantum * position_quantum)
    host_tokens = context_tokens - device_tokens
    if host_kv_bytes is not None and host_tokens * b > host_kv_bytes:
        raise ValueError(f"context_tokens={context_tokens:,} needs {host_tokens * b / GiB:.2f} GiB of host memory "
                         f"beyond the device's {device_tokens * b / GiB:.2f} GiB, but host_kv_bytes allows "
                         f"{host_kv_bytes / GiB:.2f} GiB")
    if strategy in ("split", "both", "auto") and host_tokens and throughputs.cpu_bytes_per_s <= 0:
        if strategy == "split":
            raise ValueError("strategy='split' needs throughputs.cpu_bytes_per_s > 0 (a CPU that attends)")
        strategy = "stream"
    if strategy == "stream":
        candidates = [0]
    elif strategy == "split":
        candidates = [host_tokens]
    else:
        quantum = position_quantum
        candidates = sorted({min(host_tokens, int(round(host_tokens * i / grid / quantum)) * quantum)
                             for i in range(grid + 1)} | {host_tokens})
    best = None
    for cpu_tokens in candidates:
        times = predict(device_tokens, host_tokens - cpu_tokens, cpu_tokens, block_tokens, b, throughputs)
        if best is None or max(times) < max(best[1]):
            best = (cpu_tokens, times)
    cpu_tokens, (acc_s, cpu_s) = best
    return Plan(context_tokens, device_tokens, host_tokens - cpu_tokens, cpu_tokens, block_tokens, b, acc_s, cpu_s)


def max_context_tokens(*, kv_bytes_per_token: int, device_kv_bytes: int, host_kv_bytes: int,
                       position_quantum: int = POSITION_QUANTUM) -> int:
    """The longest context `plan` accepts with these budgets: the device part
    is whole multiples of position_quantum (as `plan` rounds it), the rest
    must fit host_kv_bytes."""
    if kv_bytes_per_token <= 0 or device_kv_bytes < 0 or host_kv_bytes < 0 or position_quantum < 1:
        raise ValueError(f"kv_bytes_per_token and position_quantum must be > 0, device_kv_bytes and host_kv_bytes "
                         f">= 0, got {kv_bytes_per_token}, {position_quantum}, {device_kv_bytes}, {host_kv_bytes}")
    device_tokens = device_kv_bytes // kv_bytes_per_token // position_quantum * position_quantum
    return device_tokens + host_kv_bytes // kv_bytes_per_token


def _best_time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())                                  # compile / warm up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def _copy_rate(device, host_memory_kind, nbytes, dtype, repeats) -> float:
    """Bytes/s of one host_memory_kind -> device memory copy of nbytes."""
    on_host = SingleDeviceSharding(device, memory_kind=host_memory_kind)
    on_device = SingleDeviceSharding(device, memory_kind="device")
    host_block = jax.device_put(np.zeros((nbytes // jnp.dtype(dtype).itemsize,), dtype), on_host)
    return nbytes / _best_time(lambda: jax.device_put(host_block, on_device), repeats)


def measure_throughputs(*, kv_heads: int, head_dim: int, q_heads: Optional[int] = None, dtype=jnp.bfloat16,
                        device=None, cpu_device=None, host_memory_kind: str = "pinned_host",
                        copy_bytes: int = 256 << 20, accelerator_tokens: int = 65536, cpu_tokens: int = 16384,
                        backend: str = "einsum", cpu_backend: str = "decode:cpu", repeats: int = 3) -> Throughputs:
    """Times, on this machine: a host->device copy of copy_bytes from
    host_memory_kind; decode attention (batch 1) over accelerator_tokens on
    the device and over cpu_tokens on the CPU device; and a 256-position CPU
    call with its transfers (the fixed cost). Best of `repeats`."""
    device = device or jax.devices()[0]
    check_memory_kind(device, host_memory_kind)
    cpu_device = cpu_device or default_cpu_device(device)
    q_heads = q_heads or kv_heads
    pcie = _copy_rate(device, host_memory_kind, copy_bytes, dtype, repeats)

    def attention_rate(target, tokens, kernel):
        key = jax.random.key(0)
        q = jax.device_put(jax.random.normal(key, (1, q_heads, head_dim), dtype), target)
        kv = jax.device_put(jax.random.normal(key, (1, tokens, kv_heads, head_dim), dtype), target)
        lengths = jax.device_put(jnp.array([tokens], jnp.int32), target)
        seconds = _best_time(lambda: partial_decode_jit(q, kv, kv, lengths, backend=kernel), repeats)
        return 2 * kv.nbytes / seconds, seconds

    accelerator, _ = attention_rate(device, accelerator_tokens, backend)
    cpu, _ = attention_rate(cpu_device, cpu_tokens, cpu_backend)
    small = 256
    q = jax.device_put(jnp.zeros((1, q_heads, head_dim), dtype), device)
    kv = jax.device_put(jnp.zeros((1, small, kv_heads, head_dim), dtype), cpu_device)
    lengths = jnp.array([small], jnp.int32)

    def round_trip():
        out = partial_decode_jit(jax.device_put(q, cpu_device), kv, kv, jax.device_put(lengths, cpu_device),
                                 backend=cpu_backend)
        return jax.device_put(out, device)

    fixed = _best_time(round_trip, repeats)
    return Throughputs(pcie, accelerator, cpu, fixed)
