"""OffloadedKV: one layer's KV cache split over device memory, host memory
the accelerator streams from, and host memory the CPU attends over itself.

Positions of a row are laid out as three consecutive ranges:

    [0, cpu_tokens)                         cpu part:    [B, Sc, Hkv, D] on the CPU device
    [cpu_tokens, + stream_tokens)           stream part: [num_blocks, B, block, Hkv, D] in the
                                            accelerator's host memory ("pinned_host"), or a tuple
                                            of num_blocks [B, block, Hkv, D] arrays there
                                            (stream_blocks="separate"); the last block may be
                                            partly unused (stream_length)
    [device_start, + device capacity)       device part: [B, Sd, Hkv, D] in device memory

Each stream block is one contiguous array slice of block * Hkv * D * B
elements (>= 1 MiB at the planner's default), so a block crosses PCIe as
one DMA. New tokens are appended to the device part. A row's total length
`lengths[b]` covers the parts in order; each part's own length is the
overlap of [0, lengths[b]) with its range.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding


def memory_kinds(device) -> list:
    return [m.kind for m in device.addressable_memories()]


def check_memory_kind(device, host_memory_kind: str):
    """ValueError naming host_memory_kind when `device` cannot address it."""
    kinds = memory_kinds(device)
    if host_memory_kind not in kinds:
        raise ValueError(f"host_memory_kind={host_memory_kind!r} is not addressable by {device} "
                         f"(platform {device.platform}); it supports memory kinds {kinds}")


def default_cpu_device(accelerator):
    """The CPU device that attends over the cpu part: the host's CPU device,
    or, where the accelerator is itself a CPU device, another CPU device when
    there is one (so that the two parts still run as separate computations)."""
    cpus = jax.devices("cpu")
    if accelerator.platform != "cpu":
        return cpus[0]
    others = [d for d in cpus if d != accelerator]
    return others[0] if others else accelerator


def to_blocks(x, block_tokens: int):
    """[B, S, H, D] -> [S // block, B, block, H, D] (S a multiple of block)."""
    batch, seq = x.shape[:2]
    if seq % block_tokens:
        raise ValueError(f"stream part length {seq} must be a multiple of block_tokens={block_tokens}")
    return x.reshape(batch, seq // block_tokens, block_tokens, *x.shape[2:]).swapaxes(0, 1)


def from_blocks(blocks):
    """[num_blocks, B, block, H, D] -> [B, num_blocks * block, H, D]."""
    return blocks.swapaxes(0, 1).reshape(blocks.shape[1], -1, *blocks.shape[3:])


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["device_k", "device_v", "stream_k", "stream_v", "cpu_k", "cpu_v"],
                   meta_fields=["stream_length"])
@dataclasses.dataclass(frozen=True)
class OffloadedKV:
    """One layer's KV cache over device memory, streamed host memory and
    CPU-attended host memory (module docstring). A pytree: the device and
    stream parts can be jit arguments (memory kinds are kept); the cpu part
    lives on another device and is used outside the accelerator's jit."""
    device_k: jax.Array
    device_v: jax.Array
    stream_k: Optional[jax.Array] = None          # [nb, B, blk, Hkv, D], or a tuple of [B, blk, Hkv, D]
    stream_v: Optional[jax.Array] = None
    cpu_k: Optional[jax.Array] = None
    cpu_v: Optional[jax.Array] = None
    stream_length: Optional[int] = None   # positions the stream part holds; None = all its blocks

    @property
    def cpu_tokens(self) -> int:
        return 0 if self.cpu_k is None else self.cpu_k.shape[1]

    @property
    def stream_tokens(self) -> int:
        """Positions of the stream part (its last block may be partly unused)."""
        if self.stream_k is None:
            return 0
        capacity = self.num_blocks * self.block_tokens
        return capacity if self.stream_length is None else self.stream_length

    @property
    def block_tokens(self) -> int:
        if self.stream_k is None:
            return 0
        return self.stream_k[0].shape[1] if isinstance(self.stream_k, tuple) else self.stream_k.shape[2]

    @property
    def num_blocks(self) -> int:
        if self.stream_k is None:
            return 0
        return len(self.stream_k) if isinstance(self.stream_k, tuple) else self.stream_k.shape[0]

    @property
    def device_start(self) -> int:
        return self.cpu_tokens + self.stream_tokens

    @property
    def capacity(self) -> int:
        return self.device_start + self.device_k.shape[1]

    def part_lengths(self, lengths):
        """(cpu, stream, device) lengths [B] int32 of rows of total `lengths`."""
        lengths = jnp.asarray(lengths, jnp.int32)
        cpu = jnp.clip(lengths, 0, self.cpu_tokens)
        stream = jnp.clip(lengths - self.cpu_tokens, 0, self.stream_tokens)
        device = jnp.clip(lengths - self.device_start, 0, self.device_k.shape[1])
        return cpu, stream, device

    def nbytes(self) -> dict:
        size = lambda *xs: int(sum(x.nbytes for x in jax.tree.leaves(xs)))  # noqa: E731
        return {"device": size(self.device_k, self.device_v), "stream": size(self.stream_k, self.stream_v),
                "cpu": size(self.cpu_k, self.cpu_v)}

    def append(self, k_new, v_new, lengths):
        """Writes new tokens at positions lengths[b], lengths[b] + 1, ... (the
        row's current length onwards) of the device part; returns the new
        cache. k_new/v_new: [B, Hkv, D] (one token, decode) or [B, T, Hkv, D]
        (a prefill chunk). Positions before device_start (a host part) or past
        the capacity are dropped: the planner keeps only positions every row
        has already filled on the host."""
        batch, head_shape = self.device_k.shape[0], self.device_k.shape[2:]
        one_token = k_new.ndim == 3
        k_tokens, v_tokens = (x[:, None] if one_token else x for x in (k_new, v_new))
        if (k_tokens.ndim != 4 or k_tokens.shape[0] != batch or k_tokens.shape[2:] != head_shape
                or v_tokens.shape != k_tokens.shape):
            raise ValueError(f"k_new and v_new must have shape [B, Hkv, D] or [B, T, Hkv, D] with B, Hkv, D = "
                             f"{(batch,) + head_shape}, got {k_new.shape} and {v_new.shape}")
        count = k_tokens.shape[1]
        slot = jnp.asarray(lengths, jnp.int32)[:, None] - self.device_start + jnp.arange(count, dtype=jnp.int32)
        slot = jnp.where(slot >= 0, slot, self.device_k.shape[1])        # negative -> out of range, dropped
        rows = jnp.arange(batch)[:, None]
        device_k = self.device_k.at[rows, slot].set(k_tokens.astype(self.device_k.dtype), mode="drop")
        device_v = self.device_v.at[rows, slot].set(v_tokens.astype(self.device_v.dtype), mode="drop")
        return dataclasses.replace(self, device_k=device_k, device_v=device_v)

    @classmethod
    def from_parts(cls, device_kv, stream_kv=None, cpu_kv=None, *, block_tokens: Optional[int] = None,
                   stream_length: Optional[int] = None, device=None, cpu_device=None,
                   host_memory_kind: str = "pinned_host", stream_blocks: str = "stacked"):
        """Places each part: device_kv (k, v) [B, Sd, Hkv, D] in device memory;
        stream_kv [B, Ss, Hkv, D] cut into blocks of block_tokens (Ss a multiple)
        and moved to `host_memory_kind` of the accelerator; cpu_kv onto the CPU
        device. Parts may be None (stream, cpu) or length 0. stream_length:
        the stream part's positions when fewer than Ss (the rest is padding to
        whole blocks). stream_blocks: "stacked" (one [nb, B, blk, Hkv, D]
        array per K or V, which the stream loop slices inside jit) or
        "separate" (one host array per block, each moved whole: for backends
        whose host offloading cannot slice a host-memory array in a loop)."""
        if stream_blocks not in ("stacked", "separate"):
            raise ValueError(f"stream_blocks must be 'stacked' or 'separate', got {stream_blocks!r}")
        device = device or jax.devices()[0]
        on_device = SingleDeviceSharding(device, memory_kind="device")
        device_k, device_v = (jax.device_put(x, on_device) for x in device_kv)
        stream_k = stream_v = cpu_k = cpu_v = None
        if stream_kv is not None and stream_kv[0].shape[1] > 0:
            check_memory_kind(device, host_memory_kind)
            if not block_tokens or block_tokens <= 0:
                raise ValueError(f"block_tokens must be a positive int when stream_kv is given, got {block_tokens}")
            on_host = SingleDeviceSharding(device, memory_kind=host_memory_kind)
            if stream_blocks == "stacked":
                stream_k, stream_v = (jax.device_put(to_blocks(x, block_tokens), on_host) for x in stream_kv)
            else:
                stream_k, stream_v = (tuple(jax.device_put(x[:, i:i + block_tokens], on_host)
                                            for i in range(0, x.shape[1], block_tokens)) for x in stream_kv)
                if stream_kv[0].shape[1] % block_tokens:
                    raise ValueError(f"stream part length {stream_kv[0].shape[1]} must be a multiple of "
                                     f"block_tokens={block_tokens}")
        if cpu_kv is not None and cpu_kv[0].shape[1] > 0:
            cpu_device = cpu_device or default_cpu_device(device)
            cpu_k, cpu_v = (jax.device_put(x, cpu_device) for x in cpu_kv)
        if stream_k is None:
            stream_length = None
        elif stream_length is not None and not 0 < stream_length <= stream_kv[0].shape[1]:
            raise ValueError(f"stream_length must be in (0, {stream_kv[0].shape[1]}], got {stream_length}")
        cache = cls(device_k, device_v, stream_k, stream_v, cpu_k, cpu_v, stream_length)
        shapes = {name: x.shape for name, x in (("device_k", device_k), ("cpu_k", cpu_k)) if x is not None}
        if stream_k is not None:
            block_shape = stream_k[0].shape if isinstance(stream_k, tuple) else stream_k.shape[1:]
            shapes["stream_k"] = (block_shape[0], None) + block_shape[2:]
        if len({(s[0],) + s[2:] for s in shapes.values()}) > 1:
            raise ValueError(f"parts must agree in B, Hkv and D, got shapes {shapes}")
        return cache

    @classmethod
    def build(cls, k, v, plan, *, device_capacity: Optional[int] = None, device=None, cpu_device=None,
              host_memory_kind: str = "pinned_host", stream_blocks: str = "stacked"):
        """Splits a full cache k/v [B, S, Hkv, D] (S = plan.context_tokens) as
        `plan` says (cpu, stream, device, in position order). The device part
        gets device_capacity positions (default: its share plus none), so
        that appended tokens have room."""
        if k.shape != v.shape or k.ndim != 4:
            raise ValueError(f"k and v must both be [B, S, Hkv, D], got {k.shape} and {v.shape}")
        if k.shape[1] != plan.context_tokens:
            raise ValueError(f"k has {k.shape[1]} positions but plan.context_tokens is {plan.context_tokens}")
        cpu_end = plan.cpu_tokens
        stream_end = cpu_end + plan.stream_tokens
        pad_stream = plan.stream_capacity - plan.stream_tokens
        capacity = plan.device_tokens if device_capacity is None else device_capacity
        if capacity < plan.device_tokens:
            raise ValueError(f"device_capacity={capacity} is smaller than the plan's device_tokens "
                             f"{plan.device_tokens}")

        def pad(x, extra):
            return np.pad(np.asarray(x), ((0, 0), (0, extra), (0, 0), (0, 0))) if extra else x

        def parts(x):
            x_host = np.asarray(x) if not isinstance(x, jax.Array) else x
            return (x_host[:, :cpu_end], pad(x_host[:, cpu_end:stream_end], pad_stream),
                    pad(x_host[:, stream_end:], capacity - plan.device_tokens))

        (k_cpu, k_stream, k_dev), (v_cpu, v_stream, v_dev) = parts(k), parts(v)
        return cls.from_parts((k_dev, v_dev), (k_stream, v_stream), (k_cpu, v_cpu),
                              block_tokens=plan.block_tokens, stream_length=plan.stream_tokens or None,
                              device=device, cpu_device=cpu_device,
                              host_memory_kind=host_memory_kind, stream_blocks=stream_blocks)
