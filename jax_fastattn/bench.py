"""`python -m jax_fastattn.bench`: side-by-side attention benchmarks.

Every implementation runs in its own subprocess, one after another on the
same machine in the same invocation, so that its peak memory is its own:
the growth of the process's peak RSS (VmHWM, reset after compilation) over
the resident set holding inputs and executable; outputs count. Time
is the median of --repeats runs of the compiled function after a warm-up
(`block_until_ready`). Prints a table, writes JSON and a PNG plot.

FLOPs: forward 4·B·Hq·Sq·Skv·D, halved for causal; forward+backward 3.5x
that (the FlashAttention convention).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from typing import Callable, Dict, List

PEERS: Dict[str, List[str]] = {
    "cpu": ["fastattn-cpu", "fastattn-xla", "jax.nn-xla", "reference"],
    # torch-*: torch.nn.functional.scaled_dot_product_attention pinned to one
    # SDPBackend (FlashAttention-2 / cuDNN); pallas-mha: jax's Pallas GPU op.
    # fastattn-cuda-sm80: ours with the sm80+ (mma.sync) forward, the one
    # A100/L40/RTX GPUs run, on whatever GPU this is.
    "cuda": ["fastattn-cuda", "fastattn-cuda-sm80", "jax.nn-cudnn", "torch-cudnn", "torch-flash", "pallas-mha",
             "jax.nn-xla"],
}
# Implementations that are ours with an environment override of the handler.
OURS_WITH_ENV = {"fastattn-cuda-sm80": ("cuda", {"FASTATTN_CUDA_FORWARD": "mma_sync"})}
DECODE_PEERS: Dict[str, List[str]] = {
    "cpu": ["memcpy-numpy", "fastattn-cpu", "fastattn-xla", "jax.nn-xla"],
    "cuda": ["memcpy-device", "fastattn-cuda", "jax.nn-cudnn", "jax.nn-xla"],
}
# On a GPU each timed sample dispatches this many calls back to back and
# waits once, so that host dispatch time (tens of microseconds) does not
# count against a sub-millisecond kernel.
GPU_CALLS_PER_SAMPLE = 10
# Implementations that build the full [B, H, Sq, Skv] logits.
QUADRATIC = {"jax.nn-xla", "reference"}
TORCH_BACKENDS = {"torch-flash": "FLASH_ATTENTION", "torch-cudnn": "CUDNN_ATTENTION"}


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

    @property
    def kv_bytes(self) -> int:
        """K and V bytes a decode step must read (the whole valid cache)."""
        import numpy as np
        return 2 * self.batch * self.seq * self.kv_heads * self.head_dim * np.dtype(self.dtype).itemsize

    @property
    def flops(self) -> float:
        forward = 4.0 * self.batch * self.heads * self.seq * self.seq * self.head_dim
        forward *= 0.5 if self.causal else 1.0
        return forward * (3.5 if self.mode == "fwd_bwd" else 1.0)

    @property
    def logits_bytes(self) -> int:
        return 4 * self.batch * self.heads * self.seq * self.seq

    def label(self) -> str:
        causal = "causal" if self.causal else "full"
        return (f"B{self.batch} S{self.seq} H{self.heads}/{self.kv_heads} D{self.head_dim} "
                f"{self.dtype} {causal} {self.mode}")


def _build_decode(name: str, case: Case) -> Callable:
    """fn(q [B, Hq, D], k, v, lengths) for decode peers."""
    import jax

    from jax_fastattn import decode_attention

    if name.startswith("fastattn-"):
        backend = name.split("-", 1)[1]
        return jax.jit(lambda q, k, v, n: decode_attention(q, k, v, n, backend=backend))
    if name.startswith("jax.nn-"):
        implementation = name.split("-", 1)[1]
        return jax.jit(lambda q, k, v, n: jax.nn.dot_product_attention(
            q[:, None], k, v, key_value_seq_lengths=n, implementation=implementation)[:, 0])
    raise ValueError(f"unknown decode implementation {name!r}")


def _sample_seconds(dispatch: Callable, repeats: int, calls: int = 1, wait: Callable = lambda x: x):
    """`repeats` samples of the time per call: each sample dispatches `calls`
    calls back to back and waits once. Returns (samples, median)."""
    import numpy as np
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        wait([dispatch() for _ in range(calls)])
        times.append((time.perf_counter() - start) / calls)
    return times, float(np.median(times))


def _memcpy_bandwidth(case: Case, repeats: int) -> dict:
    """The machine's copy bandwidth with numpy (bytes read + written / s),
    on an array as large as the case's K/V cache (at least 1 GiB)."""
    import numpy as np
    n = max(case.kv_bytes, 2**30) // 4
    src = np.random.default_rng(0).random(n, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    times, median = _sample_seconds(lambda: np.copyto(dst, src), repeats)
    return {"impl": "memcpy-numpy", "case": dataclasses.asdict(case), "times_s": times, "median_s": median,
            "gbps": 2 * src.nbytes / median / 1e9, "peak_mb": 0.0, "tflops": 0.0}


def _device_copy_bandwidth(case: Case, repeats: int) -> dict:
    """Device memory bandwidth: an elementwise op over an array as large as
    the case's K/V cache (bytes read + written per second)."""
    import jax
    import jax.numpy as jnp
    n = max(case.kv_bytes, 2**30) // 2
    x = jnp.ones((n,), jnp.bfloat16)
    fn = jax.jit(lambda x: x * 2).lower(x).compile()
    jax.block_until_ready(fn(x))
    times, median = _sample_seconds(lambda: fn(x), repeats, GPU_CALLS_PER_SAMPLE, jax.block_until_ready)
    return {"impl": "memcpy-device", "case": dataclasses.asdict(case), "times_s": times, "median_s": median,
            "gbps": 2 * x.nbytes / median / 1e9, "peak_mb": 0.0, "tflops": 0.0,
            "device": str(jax.devices()[0].device_kind), "jax": jax.__version__}


def _build(name: str, case: Case) -> Callable:
    import jax
    import jax.numpy as jnp

    from jax_fastattn import flash_attention

    if name.startswith("fastattn-"):
        backend, env = OURS_WITH_ENV.get(name, (name.split("-", 1)[1], {}))
        os.environ.update(env)  # the handler reads it at every call
        attend = lambda q, k, v: flash_attention(q, k, v, causal=case.causal, backend=backend)
    elif name == "reference":
        attend = lambda q, k, v: flash_attention(q, k, v, causal=case.causal, backend="reference")
    elif name.startswith("jax.nn-"):
        implementation = name.split("-", 1)[1]

        def attend(q, k, v):  # jax.nn takes GQA k/v directly
            return jax.nn.dot_product_attention(q, k, v, is_causal=case.causal, implementation=implementation)
    elif name == "pallas-mha":
        from jax.experimental.pallas.ops.gpu.attention import mha

        def attend(q, k, v):  # the Pallas op has no GQA: K/V heads are repeated
            group = q.shape[2] // k.shape[2]
            k, v = (jnp.repeat(x, group, axis=2) for x in (k, v))
            return mha(q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=case.causal)
    else:
        raise ValueError(f"unknown implementation {name!r}")
    if case.mode == "fwd":
        return jax.jit(attend)
    loss = lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS mark (VmHWM) of this process (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    try:
        return _status_mb("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _torch_worker(name: str, case: Case, repeats: int) -> dict:
    """torch SDPA pinned to one backend; CUDA-event timing of `calls` calls."""
    import numpy as np
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = getattr(torch, case.dtype)
    shape_q = (case.batch, case.heads, case.seq, case.head_dim)
    shape_kv = (case.batch, case.kv_heads, case.seq, case.head_dim)
    grad = case.mode == "fwd_bwd"
    q = torch.randn(shape_q, device="cuda", dtype=dtype, requires_grad=grad)
    k = torch.randn(shape_kv, device="cuda", dtype=dtype, requires_grad=grad)
    v = torch.randn(shape_kv, device="cuda", dtype=dtype, requires_grad=grad)
    gqa = case.heads != case.kv_heads
    backend = getattr(SDPBackend, TORCH_BACKENDS[name])

    def step():
        with sdpa_kernel(backend):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=case.causal, enable_gqa=gqa)
        if grad:
            out.float().sum().backward()
        return out

    step()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(GPU_CALLS_PER_SAMPLE):
            step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / GPU_CALLS_PER_SAMPLE)
    median = float(np.median(times))
    return {"impl": name, "case": dataclasses.asdict(case), "times_s": times, "median_s": median,
            "tflops": case.flops / median / 1e12, "gbps": 0.0, "peak_mb": 0.0,
            "device": torch.cuda.get_device_name(), "torch": torch.__version__}


def run_worker(name: str, case: Case, repeats: int) -> dict:
    """Times one implementation on one case in this process."""
    if name in TORCH_BACKENDS:
        return _torch_worker(name, case, repeats)
    if name == "memcpy-numpy":
        return _memcpy_bandwidth(case, repeats)
    if name == "memcpy-device":
        return _device_copy_bandwidth(case, repeats)
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    dtype = jnp.dtype(case.dtype)
    q_len = 1 if case.mode == "decode" else case.seq
    q = jax.random.normal(keys[0], (case.batch, q_len, case.heads, case.head_dim), dtype)
    k = jax.random.normal(keys[1], (case.batch, case.seq, case.kv_heads, case.head_dim), dtype)
    v = jax.random.normal(keys[2], (case.batch, case.seq, case.kv_heads, case.head_dim), dtype)
    args = (q, k, v)
    if case.mode == "decode":
        args = (q[:, 0], k, v, jnp.full((case.batch,), case.seq, jnp.int32))
    jax.block_until_ready(args)
    fn = _build_decode(name, case) if case.mode == "decode" else _build(name, case)
    compiled = fn.lower(*args).compile()
    # Peak memory of running (not compiling): growth of the peak RSS over the
    # resident set once inputs and the executable exist. Outputs count.
    baseline = _status_mb("VmRSS") if _reset_peak_rss() else _peak_rss_mb()
    jax.block_until_ready(compiled(*args))  # warm-up
    calls = GPU_CALLS_PER_SAMPLE if jax.devices()[0].platform == "gpu" else 1
    times, median = _sample_seconds(lambda: compiled(*args), repeats, calls, jax.block_until_ready)
    temp_mb = None
    try:
        temp_mb = compiled.memory_analysis().temp_size_in_bytes / 2**20
    except Exception:  # not every backend reports it
        pass
    return {"impl": name, "case": dataclasses.asdict(case), "times_s": times, "median_s": median,
            "tflops": case.flops / median / 1e12, "gbps": case.kv_bytes / median / 1e9,
            "peak_mb": _peak_rss_mb() - baseline,
            "xla_temp_mb": temp_mb, "device": str(jax.devices()[0].device_kind),
            "jax": jax.__version__}


def _measure(name: str, case: Case, repeats: int, timeout: float) -> dict:
    spec = json.dumps({"impl": name, "case": dataclasses.asdict(case), "repeats": repeats})
    try:
        proc = subprocess.run([sys.executable, "-m", "jax_fastattn.bench", "--worker", spec],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"impl": name, "case": dataclasses.asdict(case), "error": f"timeout after {timeout:.0f}s"}
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"impl": name, "case": dataclasses.asdict(case), "error": tail[0][:200]}


def _table(results: List[dict]) -> str:
    if results and results[0]["case"]["mode"] == "decode":
        return _decode_table(results)
    header = f"{'case':<44} {'implementation':<16} {'median ms':>10} {'GFLOP/s':>9} {'peak MB':>9} {'vs ours':>8}"
    lines = [header, "-" * len(header)]
    ours = {}
    for r in results:
        if r["impl"].startswith("fastattn-cpu") or r["impl"] == "fastattn-cuda":
            ours[Case(**r["case"]).label()] = r.get("median_s")
    for r in results:
        label = Case(**r["case"]).label()
        if "error" in r:
            lines.append(f"{label:<44} {r['impl']:<16} {'-':>10} {'-':>9} {'-':>9} {r['error']}")
            continue
        base = ours.get(label)
        ratio = f"{r['median_s'] / base:7.2f}x" if base else "-"
        lines.append(f"{label:<44} {r['impl']:<16} {r['median_s'] * 1e3:10.2f} {r['tflops'] * 1e3:9.1f} "
                     f"{r['peak_mb']:9.0f} {ratio:>8}")
    return "\n".join(lines)


def _decode_table(results: List[dict]) -> str:
    header = f"{'case':<44} {'implementation':<16} {'median ms':>10} {'K/V GB/s':>9} {'of memcpy':>9}"
    lines = [header, "-" * len(header)]
    copy = {Case(**r["case"]).label(): r["gbps"] for r in results if r["impl"] == "memcpy-numpy" and "gbps" in r}
    for r in results:
        label = Case(**r["case"]).label()
        if "error" in r:
            lines.append(f"{label:<44} {r['impl']:<16} {'-':>10} {'-':>9} {r['error']}")
            continue
        share = f"{100 * r['gbps'] / copy[label]:8.0f}%" if label in copy and r["impl"] != "memcpy-numpy" else "-"
        lines.append(f"{label:<44} {r['impl']:<16} {r['median_s'] * 1e3:10.3f} {r['gbps']:9.1f} {share:>9}")
    return "\n".join(lines)


def _plot(results: List[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(Case(**r["case"]).label() for r in results))
    impls = list(dict.fromkeys(r["impl"] for r in results))
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(labels)), 4.5))
    width = 0.8 / max(1, len(impls))
    decode = results[0]["case"]["mode"] == "decode"
    for i, impl in enumerate(impls):
        values = []
        for label in labels:
            match = [r for r in results if r["impl"] == impl and Case(**r["case"]).label() == label]
            ok = match and "error" not in match[0]
            values.append((match[0]["gbps"] if decode else match[0]["tflops"] * 1e3) if ok else 0.0)
        ax.bar([x + i * width for x in range(len(labels))], values, width, label=impl)
    ax.set_xticks([x + width * (len(impls) - 1) / 2 for x in range(len(labels))])
    ax.set_xticklabels(labels, rotation=15, ha="right", fontsize=7)
    ax.set_ylabel("K/V GB/s read" if decode else "GFLOP/s (causal counts half)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jax_fastattn.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="cpu", choices=sorted(set(PEERS) | set(DECODE_PEERS)))
    parser.add_argument("--quick", action="store_true", help="one small case, 5 repeats (a demo)")
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=None,
                        help="batch = tokens // seq for each --seq (e.g. 16384 for B*S = 16K)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--no-causal", action="store_true")
    parser.add_argument("--mode", choices=["fwd", "fwd_bwd", "decode"], default="fwd",
                        help="decode: one query token per row against a full cache of --seq positions")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--impls", nargs="+", default=None, help="subset of the backend's peers")
    parser.add_argument("--max-quadratic-gb", type=float, default=4.0,
                        help="skip O(S^2)-memory peers whose logits alone exceed this")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--out", default="bench_out", help="folder for results.json and plot.png")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        spec = json.loads(args.worker)
        print("RESULT " + json.dumps(run_worker(spec["impl"], Case(**spec["case"]), spec["repeats"])), flush=True)
        return

    seqs = [1024] if args.quick else args.seq
    repeats = max(5, args.repeats)
    cases = [Case(max(1, args.tokens // s) if args.tokens else args.batch, s, args.heads,
                  args.kv_heads or args.heads, args.head_dim, not args.no_causal, args.dtype, args.mode)
             for s in seqs]
    peers = DECODE_PEERS if args.mode == "decode" else PEERS
    if args.impls is None and args.backend not in peers:
        parser.error(f"--backend {args.backend} has no peers for --mode {args.mode} yet")
    impls = args.impls or peers[args.backend]
    results = []
    for case in cases:
        for impl in impls:
            if impl in QUADRATIC and case.mode != "decode" and case.logits_bytes > args.max_quadratic_gb * 2**30:
                results.append({"impl": impl, "case": dataclasses.asdict(case),
                                "error": f"skipped: logits need {case.logits_bytes / 2**30:.1f} GiB"})
                continue
            print(f"running {impl:<14} {case.label()}", file=sys.stderr, flush=True)
            results.append(_measure(impl, case, repeats, args.timeout))
    print(_table(results))
    os.makedirs(args.out, exist_ok=True)
    meta = next((r for r in results if "device" in r), {})
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"command": " ".join(sys.argv), "device": meta.get("device"), "jax": meta.get("jax"),
                   "cpu_count": os.cpu_count(), "results": results}, f, indent=1)
    _plot(results, os.path.join(args.out, "plot.png"))
    print(f"\nwrote {args.out}/results.json and {args.out}/plot.png")


if __name__ == "__main__":
    main()
