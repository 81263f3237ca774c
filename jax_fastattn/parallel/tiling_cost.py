"""Cost model of the tiling-AllReduce block: chunk sizes, the all-reduce time
from link bandwidth, the pipelined block time, and `auto_num_chunks`.

The block runs on each of N devices: the K/V projection of the whole sequence,
then for each sequence chunk c the Q projection, attention against the keys
that chunk sees, the output projection by the device's rows of wo, and an
all-reduce of the chunk's [B, len_c, d_model] partial sums. Chunk c's
all-reduce runs on the collective stream while chunk c+1 computes, so

    compute stream:  t_c_end   = t_{c-1}_end + compute_c
    link:            ar_c_end  = max(t_c_end, ar_{c-1}_end) + allreduce(bytes_c)
    block time       = ar_{n-1}_end.

With one chunk this is compute + allreduce(everything); with n chunks only
the all-reduce of the last chunk (and any all-reduce longer than the next
chunk's compute) stays exposed. What this does not model: NCCL kernels take
SMs and memory bandwidth from the compute they overlap, and per-chunk kernels
run at lower efficiency than one large one (a per-chunk overhead, fixed plus
a part that grows with the sequence length, stands in for that). It is a
model, not a measurement.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class TPCostModel:
    """Device and link figures for the model.

    flops_per_s: sustained dense bf16 rate of one device (matmuls and the
      attention kernel alike).
    link_bytes_per_s: per-direction bandwidth one device has to its peers.
      H100/H200 NVLink 4: 900 GB/s bidirectional = 450 GB/s each way
      (NVIDIA H200 datasheet).
    collective_latency_s: fixed cost of one all-reduce (launch and ring
      handshakes; one-shot all-reduces of tens of KB take 5-12 us on H100,
      sglang PR #2904).
    chunk_overhead_s: fixed cost of one more chunk's kernels (launches, tile
      tails), which is what stops more chunks from always winning.
    chunk_overhead_per_token_s: the part of that cost that grows with the
      sequence length (a chunk's attention kernel ends on its longest
      key prefix: its tail grows with S).
    """

    flops_per_s: float
    link_bytes_per_s: float
    collective_latency_s: float
    chunk_overhead_s: float
    chunk_overhead_per_token_s: float = 0.0

    def chunk_overhead(self, seq_len: int) -> float:
        return self.chunk_overhead_s + self.chunk_overhead_per_token_s * seq_len

    @classmethod
    def for_platform(cls, platform: str) -> "TPCostModel":
        if platform in ("gpu", "cuda", "rocm"):
            # ~60 % of the H100/H200 989 TFLOP/s dense bf16 peak: what our
            # attention kernels and cuBLAS reach at prefill sizes (docs/BENCHMARKS.md).
            # Chunk overhead fitted to one H100's measured chunk compute
            # (docs/bench/tp_block_model_h100.json): each chunk beyond the first
            # added 75-130 us at S = 8K and 200-280 us at 32K (Llama-2-7B and
            # 38B shapes, TP 2-8), i.e. ~50 us + 5.5 ns per token of S.
            return cls(flops_per_s=600e12, link_bytes_per_s=450e9, collective_latency_s=10e-6,
                       chunk_overhead_s=50e-6, chunk_overhead_per_token_s=5.5e-9)
        # Host devices: collectives are memory copies inside one process.
        return cls(flops_per_s=50e9, link_bytes_per_s=10e9, collective_latency_s=20e-6, chunk_overhead_s=50e-6)


def allreduce_time(num_bytes: float, num_devices: int, model: TPCostModel) -> float:
    """Ring all-reduce: each device sends and receives 2(N-1)/N of the
    buffer (reduce-scatter then all-gather; Patarasuk & Yuan 2009), plus a
    fixed latency. Zero for one device."""
    if num_devices <= 1:
        return 0.0
    return model.collective_latency_s + 2.0 * (num_devices - 1) / num_devices * num_bytes / model.link_bytes_per_s


def row_flops(d_model: int, local_q_heads: int, head_dim: int) -> float:
    """Per query row and device: Q projection and output projection."""
    return 2.0 * 2.0 * d_model * local_q_heads * head_dim


def pair_flops(local_q_heads: int, head_dim: int) -> float:
    """Per visible (query, key) pair and device: QK^T and PV."""
    return 4.0 * local_q_heads * head_dim


def kv_projection_flops(seq_len: int, d_model: int, local_kv_heads: int, head_dim: int) -> float:
    return 2.0 * seq_len * d_model * 2 * local_kv_heads * head_dim


def chunk_flops(start: int, end: int, seq_len: int, causal: bool, d_model: int, local_q_heads: int,
                head_dim: int) -> float:
    """Flops of one chunk (queries [start, end)) on one device, batch 1."""
    rows = end - start
    if causal:
        # Query i (0-based, global) sees i + 1 keys.
        pairs = (end * (end + 1) - start * (start + 1)) / 2.0
    else:
        pairs = rows * seq_len
    return rows * row_flops(d_model, local_q_heads, head_dim) + pairs * pair_flops(local_q_heads, head_dim)


def _alignment(seq_len: int, num_chunks: int) -> int:
    # Chunk edges on 128-row tiles where the sequence allows it, so that no
    # chunk ends in a ragged kernel tile; tiny sequences (tests) use 1.
    return 128 if seq_len % 128 == 0 and seq_len >= 256 * num_chunks else 1


def chunk_bounds(seq_len: int, num_chunks: int, causal: bool, d_model: int = 1, local_q_heads: int = 1,
                 head_dim: int = 1) -> tuple:
    """((start, end), ...) covering [0, seq_len) in order.

    Non-causal chunks do equal work at equal sizes. Causal chunk c's queries
    see c's keys and all before, so equal sizes would make the last chunk the
    most expensive and its all-reduce, the one nothing hides, the same size
    as the others. Instead the edges equalise work: cumulative work up to
    row e is W(e) = a e + b e(e+1)/2 (a: projection flops per row, b: flops
    per visible pair), and edge c solves W(e_c) = c/n W(S). Chunks then shrink
    along the sequence: each all-reduce is smaller than the compute of the
    chunk after it (which has equal work but fewer rows), and the exposed
    last all-reduce is the smallest.
    """
    if not isinstance(num_chunks, int) or num_chunks < 1:
        raise ValueError(f"num_chunks must be a positive int or 'auto', got {num_chunks!r}")
    if num_chunks > seq_len:
        raise ValueError(f"num_chunks ({num_chunks}) must be <= the sequence length ({seq_len})")
    align = _alignment(seq_len, num_chunks)
    if causal:
        a = row_flops(d_model, local_q_heads, head_dim)
        b = pair_flops(local_q_heads, head_dim)
        total = a * seq_len + b * seq_len * (seq_len + 1) / 2.0

        def edge(work):  # positive root of b/2 e^2 + (a + b/2) e - work = 0
            half_b, lin = b / 2.0, a + b / 2.0
            return (-lin + math.sqrt(lin * lin + 4.0 * half_b * work)) / (2.0 * half_b)

        raw = [edge(total * c / num_chunks) for c in range(1, num_chunks)]
    else:
        raw = [seq_len * c / num_chunks for c in range(1, num_chunks)]
    edges = [0]
    for c, value in enumerate(raw, start=1):
        e = int(round(value / align)) * align
        # Keep every chunk non-empty whatever the rounding did.
        e = max(e, edges[-1] + align)
        e = min(e, seq_len - (num_chunks - c) * align)
        edges.append(e)
    edges.append(seq_len)
    return tuple(zip(edges[:-1], edges[1:]))


def pipeline_time(kv_time: float, chunk_compute: Sequence[float], chunk_allreduce: Sequence[float]) -> dict:
    """Block time when chunk c's all-reduce overlaps chunk c+1's compute.

    Returns {"total", "compute", "exposed_comm"} in seconds."""
    compute_end = kv_time
    link_end = 0.0
    for compute, comm in zip(chunk_compute, chunk_allreduce):
        compute_end += compute
        link_end = max(compute_end, link_end) + comm
    total = max(compute_end, link_end)
    compute = kv_time + sum(chunk_compute)
    return {"total": total, "compute": compute, "exposed_comm": total - compute}


def predict_block_time(seq_len: int, num_chunks: int, *, causal: bool, batch: int, d_model: int, q_heads: int,
                       kv_heads: int, head_dim: int, num_devices: int, bytes_per_element: int,
                       model: TPCostModel) -> dict:
    """Flop-based prediction (no measurement) of one block's time."""
    local_q, local_kv = q_heads // num_devices, kv_heads // num_devices
    bounds = chunk_bounds(seq_len, num_chunks, causal, d_model, local_q, head_dim)
    compute = [batch * chunk_flops(s, e, seq_len, causal, d_model, local_q, head_dim) / model.flops_per_s
               + model.chunk_overhead(seq_len) for s, e in bounds]
    comm = [allreduce_time(batch * (e - s) * d_model * bytes_per_element, num_devices, model) for s, e in bounds]
    kv_time = batch * kv_projection_flops(seq_len, d_model, local_kv, head_dim) / model.flops_per_s
    return pipeline_time(kv_time, compute, comm)


def auto_num_chunks(seq_len: int, *, max_chunks: int = 8, **shape) -> int:
    """The num_chunks in 1..max_chunks with the least predicted block time
    (ties to fewer chunks). `shape`: the keyword arguments of
    `predict_block_time` other than seq_len and num_chunks."""
    best, best_time = 1, math.inf
    for n in range(1, min(max_chunks, seq_len) + 1):
        t = predict_block_time(seq_len, n, **shape)["total"]
        if t < best_time * (1 - 1e-9):
            best, best_time = n, t
    return best
