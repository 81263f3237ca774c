"""CPU-GPU cooperative attention over a KV cache split between device memory
and host memory (docs/OFFLOAD.md).

    from jax_fastattn import offload
    tp = offload.measure_throughputs(kv_heads=8, head_dim=128, dtype=jnp.bfloat16)
    p = offload.plan(context_tokens, kv_bytes_per_token=..., device_kv_bytes=...,
                     host_kv_bytes=..., throughputs=tp)
    print(p)                                   # the split and its predicted time
    cache = offload.OffloadedKV.build(k, v, p) # per layer
    out = offload.decode_attention_offloaded(q, cache, lengths)
    out = offload.prefill_attention_offloaded(q_chunk, k_chunk, v_chunk, cache, lengths)
"""
from .cache import OffloadedKV, check_memory_kind
from .decode import accelerator_partial, cpu_partial, decode_attention_offloaded
from .prefill import prefill_attention_offloaded
from .partial import partial_decode
from .plan import Plan, Throughputs, max_context_tokens, measure_throughputs, plan

__all__ = ["OffloadedKV", "Plan", "Throughputs", "accelerator_partial", "check_memory_kind", "cpu_partial",
           "decode_attention_offloaded", "max_context_tokens", "measure_throughputs", "partial_decode", "plan",
           "prefill_attention_offloaded"]
