#!/usr/bin/env bash
# The CPU benchmark of issue 32: ours (fastattn-cpu) against torch SDPA's fused
# flash-attention CPU kernel (torch-sdpa-cpu) and jax.nn.dot_product_attention
# (XLA), timed round-robin in one process on the same pinned CPUs.
# Grid: f32 and bf16, causal and full, S = 1K, 4K, 8K, D = 64 and 128, B=1,
# H=8, forward; forward + backward at S=2K (f32 causal D=64/128, f32 full D=64,
# bf16 causal D=64). About 13 minutes at 2 threads. torch is optional (pip install
# torch); without it the table says the peer is missing and times the other two.
#
# Usage: tools/cpu_bench.sh [THREADS] [OUT_DIR] [extra bench options...]
#   THREADS  CPUs to pin the bench to (default: all this process may use)
#   OUT_DIR  folder for results.json and plot.png (default: bench_out/cpu_issue32_t$THREADS)
# A dry run of seconds: tools/cpu_bench.sh 2 /tmp/cpu_tiny --preset cpu-tiny
set -euo pipefail
threads="${1:-$(${PYTHON:-python3} -c 'import os; print(len(os.sched_getaffinity(0)))')}"
out="${2:-bench_out/cpu_issue32_t${threads}}"
shift $(( $# < 2 ? $# : 2 ))
# This checkout's package first (its workers are started with `python -m` too).
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
# A later --preset among the extra options overrides this one.
exec "${PYTHON:-python3}" -m jax_fastattn.bench --preset cpu-issue32 --threads "$threads" --out "$out" "$@"
