"""`python -m jax_fastattn.bench`: side-by-side attention benchmarks.

Every implementation runs in its own subprocess, one after another on the
same machine in the same invocation, so that its peak memory is its own.
All of them see the same inputs (numpy, fixed seed, drawn once per case and
shared through a temporary folder) and are timed by one
method (timing.sample_seconds): one warm-up call, then --repeats samples,
each dispatching GPU_CALLS_PER_SAMPLE calls back to back on a GPU (one on
the CPU) and waiting once (`block_until_ready` / `torch.cuda.synchronize`);
the figure is the median time per call. Forward + backward is the vjp of the
forward on a preallocated cotangent (torch: `autograd.grad`). Each worker
reports a probe of its output, diffed against one baseline per case.

On the CPU, `--interleave` (or `--preset cpu-issue32`, the grid of the CPU
comparison against torch SDPA) instead runs all of a case's implementations
in one process, compiled and warmed up first, then timed round-robin one
sample at a time (cpu_interleaved); `--threads N` pins the run to N CPUs
before any thread pool starts. Each probed forward output is also checked
against a float64 numpy evaluation of the same rows ("err f64").

FLOPs: forward 4·B·Hq·Sq·Skv·D, halved for causal; forward + backward 3.5x
that (the FlashAttention convention). Peak MB (JAX peers): growth of the
process's peak RSS (VmHWM, reset after compilation) over the resident set
holding inputs and executable; outputs count. Prints a table, writes
results.json and plot.png (TFLOP/s on a GPU, GFLOP/s on the CPU).
"""
from jax_fastattn.bench.cases import Case, make_inputs, probe, probe_rows
from jax_fastattn.bench.cli import DECODE_PEERS, PEERS, main, missing_peer, run_worker
from jax_fastattn.bench.timing import GPU_CALLS_PER_SAMPLE, sample_seconds

__all__ = ["Case", "DECODE_PEERS", "GPU_CALLS_PER_SAMPLE", "PEERS", "main", "make_inputs", "missing_peer", "probe",
           "probe_rows", "run_worker", "sample_seconds"]
