#!/usr/bin/env bash
# Standalone timing of the CUDA forward kernel variants (no JAX) and ncu
# figures of one launch: bash tests/gpu/attention_ab.sh
set -uo pipefail
nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a --use_fast_math -Ixla_ffi \
  xla_ffi/tests/cuda_attention_bench.cu xla_ffi/cuda/attention_sm80.cu -o /tmp/attention_bench || exit 1
for dim in 128 64; do
  for causal in 0 1; do
    /tmp/attention_bench 4 4096 32 $dim $causal 64
  done
done
METRICS=sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__warps_active.avg.pct_of_peak_sustained_active,smsp__warp_issue_stalled_barrier_per_warp_active.pct,smsp__warp_issue_stalled_long_scoreboard_per_warp_active.pct,smsp__warp_issue_stalled_short_scoreboard_per_warp_active.pct,smsp__warp_issue_stalled_mio_throttle_per_warp_active.pct,smsp__warp_issue_stalled_math_pipe_throttle_per_warp_active.pct,smsp__warp_issue_stalled_wait_per_warp_active.pct,smsp__warp_issue_stalled_not_selected_per_warp_active.pct,smsp__warp_issue_stalled_selected_per_warp_active.pct,smsp__warp_issue_stalled_dispatch_stall_per_warp_active.pct,smsp__issue_active.avg.pct_of_peak_sustained_active,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,smsp__inst_executed.sum,gpu__time_duration.sum
echo "== ncu D128 non-causal"
timeout 120 ncu --launch-count 1 --metrics $METRICS /tmp/attention_bench 4 4096 32 128 0 64 2>&1 | grep -E "^\s+(sm|smsp|l1tex|gpu)__"
