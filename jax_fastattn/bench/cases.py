"""One benchmark case, its FLOP and byte counts, its inputs and the output
positions every implementation reports so that the runs can be compared.

Inputs come from numpy with a fixed seed, so that JAX and torch peers see
bit-identical q, k, v (and cotangent) and their outputs can be diffed.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, Optional

import numpy as np

MODES = ("fwd", "fwd_bwd", "decode")


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    seq: int
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool
    dtype: str
    mode: str  # "fwd", "fwd_bwd" or "decode" (one query token against a cache of `seq`)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"Case.mode must be one of {MODES}, got {self.mode!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"Case.heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")

    @property
    def kv_bytes(self) -> int:
        """K and V bytes a decode step must read (the whole valid cache)."""
        return 2 * self.batch * self.seq * self.kv_heads * self.head_dim * np.dtype(_numpy_dtype(self.dtype)).itemsize

    @property
    def flops(self) -> float:
        """FlashAttention's convention: the forward is two matmuls,
        4·B·Hq·Sq·Skv·D, halved under a causal mask; forward + backward is
        3.5x the forward (the backward's five matmuls, one recomputing S)."""
        q_len = 1 if self.mode == "decode" else self.seq
        forward = 4.0 * self.batch * self.heads * q_len * self.seq * self.head_dim
        forward *= 0.5 if self.causal and self.mode != "decode" else 1.0
        return forward * (3.5 if self.mode == "fwd_bwd" else 1.0)

    @property
    def logits_bytes(self) -> int:
        return 4 * self.batch * self.heads * self.seq * self.seq

    def label(self) -> str:
        causal = "causal" if self.causal else "full"
        return (f"B{self.batch} S{self.seq} H{self.heads}/{self.kv_heads} D{self.head_dim} "
                f"{self.dtype} {causal} {self.mode}")


def _numpy_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes
        return ml_dtypes.bfloat16
    return np.dtype(name)


def make_inputs(case: Case, folder: Optional[str] = None) -> Dict[str, np.ndarray]:
    """q [B, Sq, Hq, D], k, v [B, S, Hkv, D] (and for fwd_bwd the output
    cotangent `dout` like q; for decode the `lengths`, all full), in the
    case's dtype, standard normal from a fixed seed.

    With `folder`, the arrays are read from the case's file there when one
    exists, else drawn and written there: at B·S = 16K, H = 32, D = 128
    drawing them takes seconds, reading them a tenth of one, and every
    implementation of a case needs the same ones."""
    name = case.label().replace(" ", "_").replace("/", "-")
    path = os.path.join(folder, f"inputs_{name}.npz") if folder else None
    if path and os.path.exists(path):
        with np.load(path) as stored:
            return {key: stored[key].view(_numpy_dtype(case.dtype)) if key != "lengths" else stored[key]
                    for key in stored.files}
    rng = np.random.default_rng(0)
    dtype = _numpy_dtype(case.dtype)
    q_len = 1 if case.mode == "decode" else case.seq
    normal = lambda shape: rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    inputs = {"q": normal((case.batch, q_len, case.heads, case.head_dim)),
              "k": normal((case.batch, case.seq, case.kv_heads, case.head_dim)),
              "v": normal((case.batch, case.seq, case.kv_heads, case.head_dim))}
    if case.mode == "fwd_bwd":
        inputs["dout"] = normal(inputs["q"].shape)
    if case.mode == "decode":
        inputs["q"] = inputs["q"][:, 0]
        inputs["lengths"] = np.full((case.batch,), case.seq, np.int32)
    if path:
        # Raw bits (numpy cannot store bfloat16 itself); written whole, then renamed,
        # so that a worker cut short leaves no half-written file behind.
        bits = {name: x.view(f"u{x.dtype.itemsize}") if name != "lengths" else x for name, x in inputs.items()}
        partial = path + f".{os.getpid()}.tmp.npz"
        np.savez(partial, **bits)
        os.replace(partial, path)
    return inputs


def probe_rows(case: Case):
    """Sequence positions whose values every worker reports: the first row
    (under a causal mask it sees one key), one inside, the last."""
    return sorted({0, case.seq // 3, case.seq - 1})


def probe(case: Case, out, dv=None) -> list:
    """The values a worker reports for cross-checking: of the last batch
    row, at probe_rows, heads 0 and H-1 (the last kv head under GQA), all
    of D, as float32. `out` is the forward output [B, Sq, Hq, D] (decode:
    [B, Hq, D]) or for fwd_bwd dq; `dv` [B, S, Hkv, D] is added for fwd_bwd."""
    out = np.asarray(out, np.float32)
    if case.mode == "decode":
        values = [out[-1, h] for h in (0, case.heads - 1)]
    else:
        values = [out[-1, r, h] for r in probe_rows(case) for h in (0, case.heads - 1)]
    if dv is not None:
        dv = np.asarray(dv, np.float32)
        values += [dv[-1, r, h] for r in probe_rows(case) for h in (0, case.kv_heads - 1)]
    return np.concatenate(values).tolist()


def exact_probe(case: Case, inputs: Dict[str, np.ndarray]) -> Optional[np.ndarray]:
    """The forward probe (what `probe` reports of the output) evaluated in
    float64 with numpy from the case's inputs, row by row (O(S·D) per row,
    so cheap at any S); None for other modes. Causal: query i sees keys
    j <= i (Sq == Skv, where both mask alignments agree)."""
    if case.mode != "fwd":
        return None
    group = case.heads // case.kv_heads
    scale = case.head_dim ** -0.5
    values = []
    for row in probe_rows(case):
        for head in (0, case.heads - 1):
            q = np.asarray(inputs["q"][-1, row, head], np.float64)
            visible = row + 1 if case.causal else case.seq
            k = np.asarray(inputs["k"][-1, :visible, head // group], np.float64)
            v = np.asarray(inputs["v"][-1, :visible, head // group], np.float64)
            logits = scale * (k @ q)
            weights = np.exp(logits - logits.max())
            values.append(weights @ v / weights.sum())
    return np.concatenate(values)
