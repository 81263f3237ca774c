"""Command line of `python -m jax_fastattn.bench`: runs every implementation
of a backend's peer list on each case, each in its own subprocess (or, with
--interleave / --preset, all of a case's implementations in one process,
timed round-robin: cpu_interleaved), prints a table, writes results.json and
plot.png."""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

from jax_fastattn.bench import cpu_interleaved, report, timing
from jax_fastattn.bench.cases import Case

PEERS: Dict[str, List[str]] = {
    # torch-sdpa-cpu: torch SDPA's fused flash-attention CPU kernel.
    "cpu": ["fastattn-cpu", "fastattn-xla", "jax.nn-xla", "torch-sdpa-cpu", "reference"],
    # torch-*: torch SDPA pinned to FlashAttention-2 / cuDNN; fa4:
    # FlashAttention-4 (flash_attn.cute); tokamax: its Mosaic-GPU kernel;
    # pallas-mha: jax's Pallas GPU op; fastattn-cuda-sm80: ours with the
    # sm80 (mma.sync) kernels, the ones A100/L40/RTX GPUs run;
    # fastattn-cuda-two-pass / -ordered / -atomic: our sm90 backward
    # variants ("wgmma", "wgmma_ordered" = the default, "wgmma_atomic").
    "cuda": ["fastattn-cuda", "fastattn-cuda-sm80", "fastattn-cuda-two-pass", "fastattn-cuda-ordered",
             "fastattn-cuda-atomic",
             "jax.nn-cudnn", "torch-cudnn", "tokamax", "fa4", "torch-flash", "pallas-mha", "jax.nn-xla"],
}
DECODE_PEERS: Dict[str, List[str]] = {
    "cpu": ["memcpy-numpy", "fastattn-cpu", "fastattn-xla", "jax.nn-xla"],
    "cuda": ["memcpy-device", "fastattn-cuda", "fastattn-cuda-simt", "jax.nn-cudnn", "jax.nn-xla"],
}
# Implementations that build the full [B, H, Sq, Skv] logits.
QUADRATIC = {"jax.nn-xla", "reference"}
# Peers from other packages: the module whose absence skips them.
OPTIONAL_MODULES = {"tokamax": "tokamax", "fa4": "flash_attn.cute", "torch-flash": "torch", "torch-cudnn": "torch",
                    "torch-sdpa-cpu": "torch", "pallas-mha": "jax.experimental.pallas.ops.gpu.attention"}


def missing_peer(name: str):
    """Why `name` cannot run in this environment (its package is not
    installed), or None. Found without importing it (importing torch or a
    CUDA DSL here would hold memory and libraries in the parent for the whole
    run); a package that is present but fails to import fails in its worker,
    and the table shows that error."""
    module = OPTIONAL_MODULES.get(name)
    if module is None:
        return None
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError) as error:  # a parent package missing or broken
        return f"{module}: {type(error).__name__}: {str(error)[:120]}"
    return None if found else f"no module named {module}"


def run_worker(name: str, case: Case, repeats: int, inputs_dir: Optional[str] = None) -> dict:
    """Times one implementation on one case in this process; inputs_dir
    holds (or receives) the case's inputs, shared by its implementations."""
    if name == "memcpy-numpy":
        times, median, rate = timing.numpy_copy_bandwidth(case.kv_bytes, repeats)
        return {"impl": name, "case": dataclasses.asdict(case), "times_s": times, "median_s": median,
                "gbps": rate / 1e9, "peak_mb": 0.0, "tflops": 0.0}
    if name == "memcpy-device":
        import jax
        times, median, rate = timing.device_copy_bandwidth(case.kv_bytes, repeats)
        return {"impl": name, "case": dataclasses.asdict(case), "times_s": times, "median_s": median,
                "calls_per_sample": timing.GPU_CALLS_PER_SAMPLE, "gbps": rate / 1e9, "peak_mb": 0.0,
                "tflops": 0.0, "device": str(jax.devices()[0].device_kind), "versions": {"jax": jax.__version__}}
    from jax_fastattn.bench import torch_peers
    if name in torch_peers.TORCH_IMPLS:
        return torch_peers.run(name, case, repeats, inputs_dir)
    from jax_fastattn.bench import jax_peers
    return jax_peers.run(name, case, repeats, inputs_dir)


def _measure(name: str, case: Case, repeats: int, timeout: float, inputs_dir: str) -> dict:
    spec = json.dumps({"impl": name, "case": dataclasses.asdict(case), "repeats": repeats, "inputs_dir": inputs_dir})
    try:
        proc = subprocess.run([sys.executable, "-m", "jax_fastattn.bench", "--worker", spec],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"impl": name, "case": dataclasses.asdict(case), "error": f"timeout after {timeout:.0f}s"}
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    # The last line naming an error (an out-of-memory error is followed by a traceback tail).
    tail = next((l for l in lines[::-1] if "Error" in l or "error" in l), lines[-1] if lines else "no output")
    return {"impl": name, "case": dataclasses.asdict(case), "error": tail.strip()[:200]}


def _gpu_driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
        return out.splitlines()[0] if out else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def parse_args(argv=None):
    method = sys.modules["jax_fastattn.bench"].__doc__  # the package's: what is timed and how
    parser = argparse.ArgumentParser(prog="python -m jax_fastattn.bench", description=method,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="cpu", choices=sorted(set(PEERS) | set(DECODE_PEERS)))
    parser.add_argument("--quick", action="store_true", help="one small case (S=1024), 5 repeats (a demo)")
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=None,
                        help="batch = tokens // seq for each --seq (e.g. 16384 for B*S = 16K)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--no-causal", action="store_true")
    parser.add_argument("--mode", choices=["fwd", "fwd_bwd", "decode"], default="fwd",
                        help="decode: one query token per row against a full cache of --seq positions")
    parser.add_argument("--repeats", type=int, default=5, help="samples per implementation (at least 5)")
    parser.add_argument("--impls", nargs="+", default=None, help="subset of the backend's peers")
    parser.add_argument("--max-quadratic-gb", type=float, default=4.0,
                        help="skip O(S^2)-memory peers whose logits alone exceed this")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per implementation and case")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole invocation: later workers are skipped, the running one cut")
    parser.add_argument("--out", default="bench_out", help="folder for results.json and plot.png")
    parser.add_argument("--threads", type=int, default=None,
                        help="pin the bench to this many CPUs (affinity, OMP_NUM_THREADS, torch.set_num_threads) "
                             "before any thread pool starts: the same threads for every implementation")
    parser.add_argument("--interleave", action="store_true",
                        help="time a case's implementations in one process, round-robin (default peers: "
                             + ", ".join(cpu_interleaved.CPU_PEERS) + ")")
    parser.add_argument("--preset", choices=sorted(cpu_interleaved.PRESETS),
                        help="a fixed grid of cases and repeats, timed interleaved (cpu-issue32: f32/bf16, "
                             "causal/full, S 1K/4K/8K, D 64/128 forward, and fwd+bwd at S=2K (f32 causal D 64/128, f32 "
                             "full D 64, bf16 causal D 64); "
                             "cpu-tiny: a seconds-long dry run); overrides the case options")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--interleaved-worker", help=argparse.SUPPRESS)
    return parser, parser.parse_args(argv)


def main(argv=None) -> None:
    parser, args = parse_args(argv)
    if args.interleaved_worker:
        cpu_interleaved.worker_main(args.interleaved_worker)
        return
    if args.worker:
        spec = json.loads(args.worker)
        result = run_worker(spec["impl"], Case(**spec["case"]), spec["repeats"], spec.get("inputs_dir"))
        print("RESULT " + json.dumps(result), flush=True)
        return

    cpus = None
    if args.threads is not None:
        # Before anything starts a thread pool (this process has started
        # none: jax's backends start on first use); workers inherit the mask.
        try:
            cpus = cpu_interleaved.pin_threads(args.threads)
        except ValueError as error:
            parser.error(str(error))
    seqs = [1024] if args.quick else args.seq
    repeats = max(5, args.repeats)
    cases = [Case(max(1, args.tokens // s) if args.tokens else args.batch, s, args.heads,
                  args.kv_heads or args.heads, args.head_dim, not args.no_causal, args.dtype, args.mode)
             for s in seqs]
    interleave = args.interleave or args.preset is not None
    peers = DECODE_PEERS if args.mode == "decode" else PEERS
    if args.impls is None and args.backend not in peers and not interleave:
        parser.error(f"--backend {args.backend} has no peers for --mode {args.mode} yet")
    impls = args.impls or (cpu_interleaved.CPU_PEERS if interleave else peers[args.backend])
    missing = {name: missing_peer(name) for name in impls}
    for name, why in missing.items():
        if why:
            print(f"peer missing: {name} ({why})", file=sys.stderr, flush=True)
    os.makedirs(args.out, exist_ok=True)
    if interleave:
        plan = cpu_interleaved.preset_plan(args.preset) if args.preset else [(case, repeats) for case in cases]
        present = [name for name in impls if not missing[name]]
        partial = os.path.join(args.out, "results.partial.json")
        results, environment = cpu_interleaved.drive(plan, present, args.threads, args.budget, args.timeout,
                                                     args.max_quadratic_gb, partial) if present else ([], {})
        results += [{"impl": name, "case": dataclasses.asdict(case), "error": f"peer missing: {missing[name]}"}
                    for case, _ in plan for name in impls if missing[name]]
        order = {name: i for i, name in enumerate(impls)}
        labels = {Case(**c).label(): i for i, c in enumerate(dataclasses.asdict(case) for case, _ in plan)}
        results.sort(key=lambda r: (labels[Case(**r["case"]).label()], order[r["impl"]]))
        method = {"timing": "interleaved: one process per run, every case's implementations compiled and warmed "
                            "up, then rounds that time each once, the first one rotating (timing.round_robin_order), "
                            "each timed call right after an untimed call of the same implementation (its steady "
                            "state: no other runtime's spinning thread pool takes its cores)",
                  "repeats": {c.label(): n for c, n in plan}, "calls_per_sample": 1,
                  "lead_in": cpu_interleaved.LEAD_IN}
        _finish(args, argv, results, cpus, method, environment)
        return
    deadline = time.monotonic() + args.budget if args.budget else float("inf")
    results = []
    inputs_dir = tempfile.mkdtemp(prefix="fastattn_bench_")
    for case in cases:
        for impl in impls:
            skip = None
            if missing[impl]:
                skip = "peer missing"
            elif impl in QUADRATIC and case.mode != "decode" and case.logits_bytes > args.max_quadratic_gb * 2**30:
                skip = f"skipped: logits need {case.logits_bytes / 2**30:.1f} GiB"
            elif time.monotonic() > deadline:
                skip = f"skipped: past --budget {args.budget:.0f}s"
            if skip:
                results.append({"impl": impl, "case": dataclasses.asdict(case), "error": skip})
                continue
            print(f"running {impl:<18} {case.label()}", file=sys.stderr, flush=True)
            timeout = min(args.timeout, max(1.0, deadline - time.monotonic()))
            results.append(_measure(impl, case, repeats, timeout, inputs_dir))
            # What is done so far survives a run cut short from outside.
            with open(os.path.join(args.out, "results.partial.json"), "w") as f:
                json.dump([{k: v for k, v in r.items() if k != "probe"} for r in results], f)
        for leftover in os.listdir(inputs_dir):  # this case's inputs: up to GBs
            os.remove(os.path.join(inputs_dir, leftover))
    os.rmdir(inputs_dir)
    method = {"repeats": repeats, "calls_per_sample_gpu": timing.GPU_CALLS_PER_SAMPLE,
              "timing": "each implementation in its own subprocess, one after another"}
    environment = {"cpu": cpu_interleaved.cpu_info(), "threads": args.threads, "affinity": cpus}
    _finish(args, argv, results, cpus, method, environment)


def _finish(args, argv, results: List[dict], cpus, method: dict, environment: dict) -> None:
    """Diffs, table, results.json and plot.png of a finished run."""
    report.add_diffs(results)
    gpu = args.backend != "cpu" and not (args.interleave or args.preset)
    print(report.table(results, gpu))
    meta = next((r for r in results if "device" in r), {})
    versions = dict(environment.get("versions", {}))
    for r in results:
        versions.update(r.get("versions", {}))
    method.update({"statistic": "median", "flops": "4*B*Hq*S*S*D, causal half, fwd_bwd 3.5x"})
    cpu = environment.get("cpu") or cpu_interleaved.cpu_info()
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"command": "python -m jax_fastattn.bench " + " ".join(sys.argv[1:] if argv is None else argv),
                   "device": meta.get("device") or cpu.get("model"), "gpu_driver": _gpu_driver() if gpu else None,
                   "versions": versions, "cpu_count": os.cpu_count(), "cpu": cpu, "threads": args.threads,
                   "affinity": environment.get("affinity", cpus), "torch_threads": environment.get("torch_threads"),
                   "ours_isa_levels": environment.get("ours_isa_levels"), "method": method,
                   "results": results}, f, indent=1)
    report.plot(results, os.path.join(args.out, "plot.png"), gpu, title=meta.get("device") or cpu.get("model"))
    partial = os.path.join(args.out, "results.partial.json")
    if os.path.exists(partial):
        os.remove(partial)
    print(f"\nwrote {args.out}/results.json and {args.out}/plot.png")
