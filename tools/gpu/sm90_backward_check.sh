#!/usr/bin/env bash
# GPU check of the sm90a backward: build (extension and the standalone
# timer side by side), standalone timing of the backward kernels, then
# pytest -m gpu on the GPU suites (-k $TESTS when set). Log:
# $OUT/sm90_backward.txt.
source "$(dirname "$0")/common.sh"
LOG="$OUT/sm90_backward.txt"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
(build_extension "$OUT/build_failed.txt") &
BUILD=$!
nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a --use_fast_math -Ixla_ffi \
  xla_ffi/tests/cuda_attention_bench.cu xla_ffi/cuda/dispatch.cc xla_ffi/cuda/attention_sm80.cu xla_ffi/cuda/attention_sm90.cu \
  xla_ffi/cuda/attention_backward_sm80.cu xla_ffi/cuda/attention_backward_sm90.cu \
  -o /tmp/attention_bench 2>&1 | tail -5 | tee -a "$LOG"
for dim in 128 64; do
  for causal in 0 1; do
    timeout 60 /tmp/attention_bench 4 4096 32 $dim $causal 64 bwd 2>&1 | tee -a "$LOG"
  done
done
wait $BUILD || { echo "build failed" | tee -a "$LOG"; exit 1; }
timeout ${TEST_TIMEOUT:-300} python3 -m pytest -m gpu -q -p no:cacheprovider -x ${GPU_TESTS:-tests/} \
  ${TESTS:+-k "$TESTS"} > "$OUT/pytest.txt" 2>&1
echo "pytest exit $?" | tee -a "$LOG"
grep -E "FAILED|ERROR|passed|failed" "$OUT/pytest.txt" | tail -20 | tee -a "$LOG"
