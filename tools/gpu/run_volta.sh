#!/usr/bin/env bash
# The Volta kernel's GPU checks in one call: build (the PTX header comes from
# build_tools/volta_ptx.py; carry build/volta if NVRTC 12 is not installed
# there), the m8n8k4 layout probe, pytest -m gpu, compute-sanitizer, ncu
# bank conflicts and timing of both shared-memory layouts. Log: $OUT/volta.txt.
source "$(dirname "$0")/common.sh"
LOG="$OUT/volta.txt"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
build_extension "$LOG"
grep -i "volta" /tmp/build.log | grep -v "^g++\|^gcc" | tee -a "$LOG"
python3 -c "from jax_fastattn import ffi; print('targets', sorted(ffi.cuda_targets()))" 2>&1 | tee -a "$LOG"
nvcc -arch=sm_90a -o /tmp/probe tools/gpu/mma_m8n8k4_probe.cu && /tmp/probe 2>&1 | tee -a "$LOG"
timeout 300 python3 -m pytest -m gpu -q -p no:cacheprovider ${GPU_TESTS:-tests/} -k volta 2>&1 | tail -25 | tee -a "$LOG"
SMALL="tools/gpu/volta_case.py --batch 1 --seq 300 --heads 2 --dim 64 --causal --repeat 1"
for tool in memcheck racecheck; do
  timeout 200 compute-sanitizer --tool $tool --error-exitcode 9 python3 $SMALL > /tmp/sanitizer_$tool.txt 2>&1
  echo "compute-sanitizer $tool: exit $?; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' /tmp/sanitizer_$tool.txt | tail -1)" | tee -a "$LOG"
done
METRICS=l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum,gpu__time_duration.sum
for dim in 64 128; do
  for layout in swizzled naive; do
    echo "== ncu layout=$layout dim=$dim" | tee -a "$LOG"
    timeout 200 ncu --kernel-name regex:fastattn_volta --launch-count 1 --metrics $METRICS \
      python3 tools/gpu/volta_case.py --batch 4 --seq 2048 --heads 16 --dim $dim --repeat 1 --layout $layout 2>&1 \
      | grep -E "l1tex__|gpu__time|fastattn_volta|==ERR" | tee -a "$LOG"
  done
done
for dim in 64 128; do
  for layout in swizzled naive; do
    for causal in "" "--causal"; do
      timeout 120 python3 tools/gpu/volta_case.py --batch 4 --seq 4096 --heads 16 \
        --dim $dim --repeat 30 --layout $layout $causal 2>&1 | tail -1 | tee -a "$LOG"
    done
  done
done
