#!/usr/bin/env bash
# Standalone timing of the CUDA forward and backward kernels (no JAX) and
# ncu figures of one launch of each: bash tools/gpu/attention_ab.sh
source "$(dirname "$0")/common.sh"
nvcc $timer_flags $timer_driver $timer_kernels -o /tmp/attention_bench || exit 1
for pass in fwd bwd; do
  for dim in 128 64; do
    for causal in 0 1; do
      /tmp/attention_bench 4 4096 32 $dim $causal 64 $pass
    done
  done
done
METRICS=sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__warps_active.avg.pct_of_peak_sustained_active,smsp__warp_issue_stalled_barrier_per_warp_active.pct,smsp__warp_issue_stalled_long_scoreboard_per_warp_active.pct,smsp__warp_issue_stalled_short_scoreboard_per_warp_active.pct,smsp__warp_issue_stalled_mio_throttle_per_warp_active.pct,smsp__warp_issue_stalled_math_pipe_throttle_per_warp_active.pct,smsp__warp_issue_stalled_wait_per_warp_active.pct,smsp__issue_active.avg.pct_of_peak_sustained_active,lts__throughput.avg.pct_of_peak_sustained_elapsed,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,smsp__inst_executed.sum,gpu__time_duration.sum
echo "== ncu forward, D128 non-causal"
timeout 120 ncu --launch-count 1 --metrics $METRICS /tmp/attention_bench 4 4096 32 128 0 64 fwd 2>&1 | grep -E "^\s+(sm|smsp|l1tex|lts|gpu)__"
for kernel in dkdv_kernel dq_kernel; do
  echo "== ncu backward $kernel, D128 non-causal"
  timeout 120 ncu --kernel-name regex:$kernel --launch-count 1 --metrics $METRICS \
    /tmp/attention_bench 4 4096 32 128 0 64 bwd 2>&1 | grep -E "^\s+(sm|smsp|l1tex|lts|gpu)__"
done
