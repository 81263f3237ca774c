"""decode_attention(): one new query token per sequence against a KV cache,
contiguous or paged."""
from __future__ import annotations

import math
from typing import Optional

import jax.numpy as jnp
import numpy as np

from . import backends, ffi, masks, sharding
from .attention import check_cpu_isa, check_inputs, config_or_default, flash_attention
from .config import DEFAULT, KernelConfig
from .errors import ArgumentError


_NAMES = ("q", "k_cache", "v_cache")


def _check(q, k_cache, v_cache, lengths, page_table, softmax_scale):
    if not hasattr(q, "ndim") or q.ndim != 3:
        raise ArgumentError(f"q must have rank 3 [B, Hq, D] (one new token per row), got shape {np.shape(q)}")
    layout = "[num_pages, page_size, Hkv, D]" if page_table is not None else "[B, Smax, Hkv, D]"
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not hasattr(cache, "ndim") or cache.ndim != 4:
            raise ArgumentError(f"{name} must have rank 4 {layout}, got shape {np.shape(cache)}")
    batch = q.shape[0]
    if np.shape(lengths) != (batch,):
        raise ArgumentError(f"lengths must have shape [B] = ({batch},), got {np.shape(lengths)}")
    if not jnp.issubdtype(jnp.result_type(lengths), jnp.integer):
        raise ArgumentError(f"lengths must be an integer array, got dtype {jnp.result_type(lengths)}")
    if page_table is not None:
        if np.ndim(page_table) != 2 or np.shape(page_table)[0] != batch:
            raise ArgumentError(f"page_table must have shape [B, max_pages] with B={batch}, got {np.shape(page_table)}")
        if not jnp.issubdtype(jnp.result_type(page_table), jnp.integer):
            raise ArgumentError(f"page_table must be an integer array, got dtype {jnp.result_type(page_table)}")
        # Checked as attention over the pages' rows: same dtype, D and heads.
        check_inputs(q[:1, None], k_cache[:1], v_cache[:1], None, softmax_scale, names=_NAMES)
    else:
        if k_cache.shape[0] != batch:
            raise ArgumentError(f"k_cache batch ({k_cache.shape[0]}) must equal q batch ({batch})")
        check_inputs(q[:, None], k_cache, v_cache, None, softmax_scale, names=_NAMES)


# The CUDA-core kernel's split grid aims at this many CTAs: enough to fill
# an H100 (132 SMs) several times over, even for B = 1.
_SIMT_TARGET_CTAS = 8 * 132
_SMS = 132  # H100 and H200
# The tensor-core kernel's CTA keeps 3 stages of 64-key K and V tiles in
# shared memory (96 KiB at D=128, 48 KiB at D=64): 2 or 4 CTAs per SM.
_MMA_CTAS_PER_SM = {64: 4, 128: 2}
# Its grid is sized to whole waves of those slots: the fewest splits whose
# CTAs fill at least this share of all their waves (or make 4 waves, where
# the last one's idle slots cost little). On an H100 at Hq/Hkv 32/8, D=128
# (tools/gpu/decode_splits.py, docs/bench/decode_h100): B=1, S=128K 0.199
# ms at 32 splits (one wave) against 0.230 ms at 132; B=8, S=32K 0.376 ms
# at 4 against 0.387 ms at 17; B=32, S=8K 0.385 ms unsplit against 0.395
# ms at 5.
_MMA_WAVE_FILL = 0.95


def decode_num_splits(batch: int, kv_heads: int, group: int, max_len: int, kernel: str = "simt",
                      head_dim: int = 128) -> int:
    """Key splits of the CUDA decode kernel `kernel` ("simt" or "mma_sync";
    static: it shapes the workspace), at least 256 keys each. A simt CTA
    takes up to 8 q heads of one kv head, a mma_sync CTA the whole GQA
    group."""
    most = max(1, -(-max_len // 256))
    if kernel == "simt":
        ctas = batch * kv_heads * (1 if group == 1 else -(-group // 8))
        return max(1, min(most, -(-_SIMT_TARGET_CTAS // ctas)))
    ctas, slots = batch * kv_heads, _SMS * _MMA_CTAS_PER_SM.get(head_dim, 2)
    for splits in range(1, most + 1):
        total = ctas * splits
        waves = -(-total // slots)
        if waves >= 4 or (total >= _MMA_WAVE_FILL * slots and total >= _MMA_WAVE_FILL * waves * slots):
            return splits
    return most


def _mma_sync_obstacles(q, k_cache) -> list:
    """Why the tensor-core decode kernel cannot take the call; empty if it can."""
    group = q.shape[1] // k_cache.shape[2]
    return [w for w, bad in ((f"dtype bfloat16 or float16 (got {q.dtype})", q.dtype not in (jnp.bfloat16, jnp.float16)),
                             (f"head dim 64 or 128 (got {q.shape[-1]})", q.shape[-1] not in (64, 128)),
                             (f"at most 16 q heads per kv head (got {group})", group > 16)) if bad]


def cuda_decode_kernel(config: KernelConfig, q, k_cache) -> str:
    """The CUDA decode kernel a call runs: config.cuda_decode, with "auto"
    taking the tensor-core kernel where it can run the call (it reads the
    cache at 92-100 % of a device copy's rate on an H100 where the CUDA-core
    kernel reaches 72-87 %), else the CUDA-core one."""
    if config.cuda_decode != "auto":
        return config.cuda_decode
    return "simt" if _mma_sync_obstacles(q, k_cache) else "mma_sync"


def _gather_pages(cache, page_table):
    """[num_pages, page, H, D] pages -> [B, max_pages * page, H, D] rows."""
    rows = cache[page_table]  # [B, max_pages, page, H, D]
    return rows.reshape(rows.shape[0], -1, *rows.shape[3:])


def _decode_config(config, backend: str, q, k_cache) -> KernelConfig:
    """The KernelConfig of a decode call; a decode-irrelevant or
    wrong-backend choice, or a cuda_decode kernel that cannot take the call,
    is an error, not ignored."""
    config = config_or_default(config)
    chosen = {f: getattr(config, f) for f in ("cuda_forward", "cuda_backward", "volta_layout", "tiles")
              if getattr(config, f) != getattr(DEFAULT, f)}
    if chosen:
        raise ArgumentError(f"config.{'/'.join(chosen)} choose attention kernels; decode_attention takes only "
                            f"config.cpu_isa and config.cuda_decode")
    check_cpu_isa(config, backend)
    if config.cuda_decode != DEFAULT.cuda_decode and backend != "cuda":
        raise ArgumentError(f"config.cuda_decode chooses the CUDA decode kernel, but the call runs on "
                            f"backend={backend!r}; leave it 'auto'")
    if config.cuda_decode == "mma_sync":
        why = _mma_sync_obstacles(q, k_cache)
        if why:
            raise ArgumentError(f"config.cuda_decode='mma_sync' needs {', '.join(why)}; use 'simt' or 'auto'")
    return config


def decode_attention(q, k_cache, v_cache, lengths, *, page_table=None, softmax_scale: Optional[float] = None,
                     backend: str = "auto", config: Optional[KernelConfig] = None, return_lse: bool = False):
    """Attention of q [B, Hq, D] over the first lengths[b] cached positions.

    Caches are contiguous, k_cache/v_cache [B, Smax, Hkv, D], or paged:
    k_cache/v_cache [num_pages, page_size, Hkv, D] with page_table int32
    [B, max_pages] naming the page that holds positions
    [i * page_size, (i + 1) * page_size) of row b. Returns [B, Hq, D] in q's
    dtype, and with return_lse=True also lse float32 [B, Hq], the log of
    the softmax denominator log(sum_j exp(scale * q.k_j)) over the valid
    keys (what `merge_partials` needs to combine this result with attention
    over other keys). A row with length 0 returns zeros (lse -inf); cache rows at or past the
    length are never read (they may hold garbage, NaN included). Equals
    `flash_attention` with Sq = 1 over the valid prefix.

    backend "cpu" (and "cuda" on GPUs) run split-KV (flash-decoding)
    kernels; "xla" and "reference" express the valid prefix as a segment mask
    of flash_attention (pages gathered first). config: a KernelConfig; decode
    reads only its cpu_isa (the CPU kernel's instruction-set level) and
    cuda_decode (the CUDA kernel: CUDA_DECODE_KERNELS), and other choices are
    errors here as they would be for the attention kernels.
    """
    _check(q, k_cache, v_cache, lengths, page_table, softmax_scale)
    if not isinstance(return_lse, (bool, np.bool_)):
        raise ArgumentError(f"return_lse must be a Python bool, got {type(return_lse).__name__}")
    concrete = backends.resolve(backend, "decode", q.dtype, q.shape[-1]).name
    config = _decode_config(config, concrete, q, k_cache)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    lengths = jnp.asarray(lengths, jnp.int32)
    if concrete in ("cpu", "cuda"):
        table = ffi.absent(jnp.int32) if page_table is None else jnp.asarray(page_table, jnp.int32)
        max_len = k_cache.shape[1] * (1 if page_table is None else table.shape[1])
        kernel = cuda_decode_kernel(config, q, k_cache) if concrete == "cuda" else "auto"
        splits = decode_num_splits(q.shape[0], k_cache.shape[2], q.shape[1] // k_cache.shape[2], max_len,
                                   kernel, q.shape[-1]) if concrete == "cuda" else 1
        call = sharding.decode_call(concrete, scale, page_table is not None, splits, config.cpu_isa, kernel)
        out, lse = call(q, k_cache, v_cache, lengths, table)[:2]
        return (out, lse) if return_lse else out
    if page_table is not None:
        k_cache, v_cache = _gather_pages(k_cache, page_table), _gather_pages(v_cache, page_table)
    batch, s_max = q.shape[0], k_cache.shape[1]
    valid = jnp.arange(s_max, dtype=jnp.int32)[None, :] < lengths[:, None]
    # Rows past the length may hold garbage (NaN included): zeroed, since a
    # masked key's weight is 0 but 0 x NaN is NaN in P V.
    k_cache, v_cache = (jnp.where(valid[:, :, None, None], c, jnp.zeros((), c.dtype)) for c in (k_cache, v_cache))
    kv_ids = jnp.where(valid, 0, -1).astype(jnp.int32)
    q_ids = jnp.zeros((batch, 1), jnp.int32)
    out, lse = flash_attention(q[:, None], k_cache, v_cache, mask=masks.Segments(q_ids, kv_ids),
                               softmax_scale=scale, backend=concrete, return_lse=True)
    return (out[:, 0], lse[:, :, 0]) if return_lse else out[:, 0]
