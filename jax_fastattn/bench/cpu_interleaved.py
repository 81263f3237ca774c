"""The CPU benchmark against PyTorch's fused SDPA: ours ("fastattn-cpu"),
XLA (`jax.nn.dot_product_attention(implementation="xla")`, "jax.nn-xla") and
torch SDPA's flash-attention CPU kernel ("torch-sdpa-cpu") on the same
inputs, in ONE process, timed round-robin (timing.interleaved_samples), on
the same pinned set of CPUs.

Threads: `pin_threads(n)` restricts the bench process to n of the CPUs it
may run on (os.sched_setaffinity) and sets OMP_NUM_THREADS before the
worker process that times anything starts; the worker inherits the mask, so
every thread pool is sized from it when it starts: XLA's CPU client and our
kernel's pool read the affinity mask, torch reads OMP_NUM_THREADS (and the
worker also calls torch.set_num_threads(n)).

The worker (`run_plan`) takes a list of (case, repeats), prepares every
implementation of a case (compiled ahead of time; one warm-up call, whose
output is the probe), times them interleaved, and reports one result per
implementation and case as a `RESULT` line; `drive` runs it from the CLI,
starting a new worker for the cases left should one die (out of memory).
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import platform
import queue
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from jax_fastattn.bench import timing
from jax_fastattn.bench.cases import Case, exact_probe

CPU_PEERS = ["fastattn-cpu", "jax.nn-xla", "torch-sdpa-cpu"]
# CPU features that decide which kernels run: AVX2 / AVX-512 FMA paths,
# AVX-512 BF16 dot products, AMX tiles (torch's bf16 GEMMs through oneDNN).
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
# Samples per implementation by sequence length in the issue-32 grid: the
# whole grid (XLA's quadratic peer takes ~5-12 s a call at 8K on 2 cores)
# stays within ~15 minutes on a 2-core machine.
ISSUE32_REPEATS = {1024: 15, 2048: 7, 4096: 7, 8192: 5}
# Each timed call follows an untimed call of the same implementation
# (timing.interleaved_samples lead_in): torch's OpenMP workers and XLA's
# Eigen pool spin after a call, and, measured on the 2-core machine, made
# the next implementation's 3.3 ms call (bf16, S=1K) 1.0-1.2 ms slower.
LEAD_IN = True


def _issue32_plan() -> List[Tuple[Case, int]]:
    """f32 and bf16, causal and full, S = 1K, 4K, 8K, D = 64 and 128, B=1,
    H=8, forward; and forward + backward at S=2K: f32 causal D=64 and 128,
    f32 full D=64, bf16 causal D=64."""
    plan = [(Case(1, seq, 8, 8, dim, causal, dtype, "fwd"), ISSUE32_REPEATS[seq])
            for seq in (1024, 4096, 8192) for dtype in ("float32", "bfloat16")
            for causal in (True, False) for dim in (64, 128)]
    plan += [(Case(1, 2048, 8, 8, dim, causal, dtype, "fwd_bwd"), ISSUE32_REPEATS[2048])
             for dtype, causal, dim in (("float32", True, 64), ("float32", True, 128), ("float32", False, 64),
                                        ("bfloat16", True, 64))]
    return plan


def _tiny_plan() -> List[Tuple[Case, int]]:
    """Seconds in all: for tests and a dry run."""
    return [(Case(1, 64, 2, 2, 16, True, "float32", "fwd"), 5),
            (Case(1, 96, 2, 2, 32, False, "bfloat16", "fwd"), 5),
            (Case(1, 48, 2, 2, 16, True, "float32", "fwd_bwd"), 5)]


PRESETS: Dict[str, Callable[[], List[Tuple[Case, int]]]] = {"cpu-issue32": _issue32_plan, "cpu-tiny": _tiny_plan}


def preset_plan(name: str) -> List[Tuple[Case, int]]:
    if name not in PRESETS:
        raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]()


def pin_threads(threads: int) -> List[int]:
    """Restricts this process, and every process it starts, to the first
    `threads` CPUs of those it may run on; sets OMP_NUM_THREADS (and MKL's)
    to match for the processes it starts. Call it before any thread pool
    exists (before a JAX backend or torch starts). Returns the CPUs."""
    allowed = sorted(os.sched_getaffinity(0))
    if not isinstance(threads, int) or not 1 <= threads <= len(allowed):
        raise ValueError(f"--threads must be an integer from 1 to {len(allowed)} (the CPUs this process may run on), "
                         f"got {threads!r}")
    cpus = allowed[:threads]
    os.sched_setaffinity(0, cpus)
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(threads)
    return cpus


def cpu_info(path: str = "/proc/cpuinfo") -> dict:
    """The CPU model and whether it has each of ISA_FLAGS (first processor
    listed; Linux). Unknown where the file is absent."""
    model, flags = None, None
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key == "flags" and flags is None:
                    flags = set(value.split())
    except OSError:
        pass
    return {"model": model or platform.processor() or None,
            "isa": None if flags is None else {flag: flag in flags for flag in ISA_FLAGS}}


def ours_isa_levels():
    """`jax_fastattn.ffi.cpu_isa_levels()` where the library has it (which
    ISA paths our kernel was built with and picks here), else None."""
    from jax_fastattn import ffi
    levels = getattr(ffi, "cpu_isa_levels", None)
    if levels is None:
        return None
    try:
        return json.loads(json.dumps(levels(), default=str))
    except Exception as error:  # report it; the timings are still worth having
        return f"error: {type(error).__name__}: {str(error)[:200]}"


def environment(threads: Optional[int]) -> dict:
    """What the results depend on, recorded by the worker that timed them."""
    import jax
    import jaxlib

    found = {"python": platform.python_version(), "numpy": np.__version__, "jax": jax.__version__,
             "jaxlib": jaxlib.__version__}
    torch_threads = None
    try:
        import torch
        found["torch"] = torch.__version__
        torch_threads = torch.get_num_threads()
    except ImportError:
        pass
    return {"cpu": cpu_info(), "ours_isa_levels": ours_isa_levels(), "threads": threads,
            "affinity": sorted(os.sched_getaffinity(0)), "torch_threads": torch_threads, "versions": found}


def prepare(name: str, case: Case, host: dict) -> Tuple[Callable, Callable, Callable, float]:
    """(dispatch, wait, probe_of, prepare seconds) of implementation `name`
    on the case's inputs `host`: a JAX peer compiled ahead of time, the
    torch peer with its tensors in its own layout."""
    start = time.perf_counter()
    from jax_fastattn.bench import torch_peers
    if name in torch_peers.TORCH_IMPLS:
        step, probe_of = torch_peers.prepare(name, case, host)
        return step, torch_peers.wait_fn(name), probe_of, time.perf_counter() - start
    import jax

    from jax_fastattn.bench import jax_peers
    compiled, args = jax_peers.prepare(name, case, host)
    return (lambda: compiled(*args)), jax.block_until_ready, (lambda r: jax_peers.probe_of(case, r)), \
        time.perf_counter() - start


def _error(name: str, case: Case, error: str) -> dict:
    return {"impl": name, "case": dataclasses.asdict(case), "error": error}


def time_case(case: Case, repeats: int, impls: Sequence[str], host: dict,
              prepare_fn: Callable = prepare, clock: Callable[[], float] = time.perf_counter) -> List[dict]:
    """Prepares every implementation of `impls` on the case (one warm-up
    call each, whose output is its probe), times those that worked
    interleaved, and returns one result per implementation (an error for
    one that failed). The probe's largest error against a float64 numpy
    evaluation of the same rows is `max_abs_err_f64` (forward cases)."""
    ready, results = {}, {}
    for name in impls:
        try:
            dispatch, wait, probe_of, prepare_s = prepare_fn(name, case, host)
            start = clock()
            output = dispatch()
            wait([output])
            warmup_s = clock() - start
            results[name] = {"impl": name, "case": dataclasses.asdict(case), "probe": probe_of(output),
                             "prepare_s": prepare_s, "warmup_s": warmup_s}
            del output
            ready[name] = (dispatch, wait)
        except Exception as error:  # one failing peer must not cost the others' figures
            results[name] = _error(name, case, f"{type(error).__name__}: {str(error)[:200]}")
    if ready:
        times, _ = timing.interleaved_samples(ready, repeats, 1, clock, lead_in=LEAD_IN)
        exact = exact_probe(case, host)
        for name, samples in times.items():
            median = float(np.median(samples))
            r = results[name]
            r.update({"times_s": samples, "median_s": median, "calls_per_sample": 1, "repeats": repeats,
                      "tflops": case.flops / median / 1e12, "gbps": 0.0, "peak_mb": None,
                      # On a shared machine: how busy it was (1-minute load average) when this case ended.
                      "load_average": os.getloadavg()[0]})
            if exact is not None:
                r["max_abs_err_f64"] = float(np.max(np.abs(np.asarray(r["probe"], np.float64) - exact)))
    return [results[name] for name in impls]


def run_plan(plan: Sequence[Tuple[Case, int]], impls: Sequence[str], threads: Optional[int],
             deadline: float, max_quadratic_gb: float, emit: Callable[[str], None]) -> None:
    """The worker: times every case of `plan` (interleaved), emitting a
    `META` line first and a `RESULT` line per implementation and case.
    `deadline` (time.time()) skips the cases it leaves no time for."""
    from jax_fastattn.bench.cases import make_inputs
    from jax_fastattn.bench.cli import QUADRATIC

    if threads and any(name.startswith("torch") for name in impls):
        import torch
        torch.set_num_threads(threads)
    emit("META " + json.dumps(environment(threads)))
    for case, repeats in plan:
        skipped = {}
        for name in impls:
            if time.time() > deadline:
                skipped[name] = "skipped: past --budget"
            elif name in QUADRATIC and case.logits_bytes > max_quadratic_gb * 2**30:
                skipped[name] = f"skipped: logits need {case.logits_bytes / 2**30:.1f} GiB"
        running = [name for name in impls if name not in skipped]
        print(f"timing {case.label()}: {', '.join(running) or 'nothing'} x {repeats}", file=sys.stderr, flush=True)
        timed = {r["impl"]: r for r in time_case(case, repeats, running, make_inputs(case))} if running else {}
        for name in impls:
            emit("RESULT " + json.dumps(timed.get(name) or _error(name, case, skipped[name])))
        gc.collect()  # executables and outputs of this case go before the next one's


def drive(plan: Sequence[Tuple[Case, int]], impls: Sequence[str], threads: Optional[int], budget: Optional[float],
          case_timeout: float, max_quadratic_gb: float, partial_path: Optional[str] = None) -> Tuple[List[dict], dict]:
    """Runs the worker (`python -m jax_fastattn.bench --interleaved-worker`)
    over the plan and collects its results and META; a worker that dies or
    runs past `case_timeout` on one case costs that case (recorded as an
    error), and a new worker takes the cases after it. The results so far
    are rewritten to `partial_path` after every case."""
    deadline = time.time() + budget if budget else float("inf")
    results: List[dict] = []
    meta: dict = {}
    remaining = list(plan)
    while remaining:
        spec = {"plan": [[dataclasses.asdict(c), n] for c, n in remaining], "impls": list(impls),
                "threads": threads, "deadline": min(deadline, 1e18), "max_quadratic_gb": max_quadratic_gb}
        done, failure = _run_worker_process(spec, case_timeout, len(impls), results, meta, partial_path)
        remaining = remaining[done:]
        if failure and remaining:  # the case it was on
            case = remaining.pop(0)
            print(f"worker failed on {case[0].label()}: {failure}", file=sys.stderr, flush=True)
            have = {r["impl"] for r in results if r["case"] == dataclasses.asdict(case[0])}
            results += [_error(name, case[0], failure) for name in impls if name not in have]
    return results, meta


def _run_worker_process(spec: dict, case_timeout: float, per_case: int, results: List[dict],
                        meta: dict, partial_path: Optional[str]) -> Tuple[int, Optional[str]]:
    """One worker over spec's plan: appends its results (and META) as they
    come. Returns (cases finished, why it stopped early or None)."""
    with tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "jax_fastattn.bench", "--interleaved-worker", json.dumps(spec)],
                                stdout=subprocess.PIPE, stderr=stderr, text=True)
        lines: "queue.Queue[Optional[str]]" = queue.Queue()
        reader = threading.Thread(target=lambda: [lines.put(l) for l in proc.stdout] + [lines.put(None)], daemon=True)
        reader.start()
        count, failure = 0, None
        case_start = time.monotonic()
        while True:
            try:
                line = lines.get(timeout=max(0.1, case_start + case_timeout - time.monotonic()))
            except queue.Empty:
                proc.kill()
                failure = f"timeout after {case_timeout:.0f}s"
                break
            if line is None:
                break
            if line.startswith("META "):
                meta.update(json.loads(line[5:]))
            elif line.startswith("RESULT "):
                results.append(json.loads(line[7:]))
                count += 1
                if count % per_case == 0:
                    case_start = time.monotonic()
                    _print_progress(results[-per_case:])
                    if partial_path:  # what is done so far survives a run cut short from outside
                        with open(partial_path, "w") as f:
                            json.dump({"environment": meta, "results": results}, f)
        proc.wait()
        reader.join(timeout=5)
        if failure is None and proc.returncode != 0:
            stderr.seek(0)
            tail = [l for l in stderr.read().strip().splitlines() if l.strip()]
            named = next((l for l in tail[::-1] if "rror" in l or "Killed" in l), tail[-1] if tail else "no output")
            failure = f"worker exited with {proc.returncode}: {named.strip()[:200]}"
    return count // per_case, failure


def _print_progress(case_results: List[dict]) -> None:
    label = Case(**case_results[0]["case"]).label()
    figures = [f"{r['impl']} {r['median_s'] * 1e3:.1f} ms" if "median_s" in r else f"{r['impl']} {r['error'][:40]}"
               for r in case_results]
    print(f"{label}: " + ", ".join(figures), file=sys.stderr, flush=True)


def worker_main(spec_json: str) -> None:
    # Every peer of the CPU grid runs on the CPU, XLA's too, also on a
    # machine with a GPU (where jax would otherwise default to it).
    import jax
    jax.config.update("jax_platforms", "cpu")
    spec = json.loads(spec_json)
    plan = [(Case(**case), repeats) for case, repeats in spec["plan"]]
    run_plan(plan, spec["impls"], spec["threads"], spec["deadline"], spec["max_quadratic_gb"],
             lambda line: print(line, flush=True))
