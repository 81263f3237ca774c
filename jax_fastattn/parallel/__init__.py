"""Attention across devices.

- `tp_attention_block`: the tensor-parallel attention block with FastAttention's
  tiling-AllReduce (the output projection's all-reduce cut into sequence
  chunks and overlapped with the next chunk's compute); tiling_allreduce.py.
- `context_parallel_attention`: attention with the sequence axis sharded,
  as a ring (K/V blocks travelling by ppermute, load-balanced for causal
  masks) or an all-gather of K/V; context.py.

Imported lazily, so that each module loads only what it uses.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "tp_attention_block": "tiling_allreduce",
    "context_parallel_attention": "context",
    "choose_strategy": "context",
    "to_zigzag": "context",
    "from_zigzag": "context",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
