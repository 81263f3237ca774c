#!/usr/bin/env bash
# GPU check of the sm90a backward: build (extension and the standalone
# timer side by side), standalone timing of the wgmma backwards, each against the
# mma.sync one (max differences of dQ, dK, dV; TIMING=0 skips), compute-sanitizer memcheck and
# racecheck of the standalone backward on small shapes (SANITIZE=0 skips),
# the forward + backward bench of our backward variants beside cuDNN
# (BENCH=0 skips; BENCH_SEQ, BENCH_IMPLS; BENCH_FULL=1 adds the unmasked case), then pytest -m gpu on GPU_TESTS
# (-k $TESTS when set). Log: $OUT/sm90_backward.txt.
source "$(dirname "$0")/common.sh"
LOG="$OUT/sm90_backward.txt"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
(build_extension "$OUT/build_failed.txt") &
BUILD=$!
build_attention_timer "$LOG"
# Backward choices (KernelChoice codes): 1 wgmma (two passes), 3
# wgmma_ordered (what 0, auto, takes: the timer passes the dQ workspace),
# 4 wgmma_atomic.
CHOICES=${CHOICES:-1 3 4}
# A small smoke run first: a hang or a failure ends the check here.
for choice in $CHOICES; do
  for dim in 128 64; do
    echo "choice $choice:" | tee -a "$LOG"
    timeout 30 /tmp/attention_bench 1 700 4 $dim 1 64 bwd 1 uniform $choice 2>&1 | tee -a "$LOG"
    status=${PIPESTATUS[0]}
    [ "$status" = 0 ] || { echo "smoke run D=$dim choice $choice: exit $status" | tee -a "$LOG"; kill $BUILD; exit 1; }
  done
done
for choice in $([ "${TIMING:-1}" = 1 ] && echo $CHOICES); do
  for dim in 128 64; do
    for causal in 0 1; do
      echo "choice $choice:" | tee -a "$LOG"
      timeout 60 /tmp/attention_bench 4 4096 32 $dim $causal 64 bwd 20 uniform $choice 2>&1 | tee -a "$LOG"
    done
  done
done
if [ "${SANITIZE:-1}" = 1 ]; then
  for tool in memcheck racecheck; do
    for choice in $CHOICES; do
      for dim in 128 64; do
        timeout 150 compute-sanitizer --tool $tool --error-exitcode 9 /tmp/attention_bench 1 700 4 $dim 1 64 bwd 1 \
          uniform $choice > /tmp/sanitizer.txt 2>&1
        echo "compute-sanitizer $tool choice $choice D=$dim: exit $?; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' /tmp/sanitizer.txt | tail -1)" \
          | tee -a "$LOG"
        grep -m5 -E "Invalid|Race|hazard" /tmp/sanitizer.txt | tee -a "$LOG"
      done
    done
  done
fi
wait $BUILD || { echo "build failed" | tee -a "$LOG"; exit 1; }
if [ "${BENCH:-1}" = 1 ]; then
  timeout ${BENCH_TIMEOUT:-240} python3 -m jax_fastattn.bench --backend cuda --dtype bfloat16 --heads 32 --tokens 16384 \
    --repeats 12 --head-dim ${BENCH_DIM:-128} --seq ${BENCH_SEQ:-4096 16384} --mode fwd_bwd --budget 150 \
    --impls ${BENCH_IMPLS:-fastattn-cuda fastattn-cuda-two-pass fastattn-cuda-atomic jax.nn-cudnn torch-cudnn} \
    --out "$OUT/bench_fwdbwd" 2>&1 | grep -v "^running" | tee -a "$LOG"
  if [ "${BENCH_FULL:-0}" = 1 ]; then  # the same without a mask
    timeout ${BENCH_TIMEOUT:-240} python3 -m jax_fastattn.bench --backend cuda --dtype bfloat16 --heads 32 --tokens 16384 \
      --repeats 12 --head-dim ${BENCH_DIM:-128} --seq ${BENCH_FULL_SEQ:-4096} --no-causal --mode fwd_bwd --budget 100 \
      --impls ${BENCH_IMPLS:-fastattn-cuda fastattn-cuda-two-pass fastattn-cuda-atomic jax.nn-cudnn torch-cudnn} \
      --out "$OUT/bench_fwdbwd_full" 2>&1 | grep -v "^running" | tee -a "$LOG"
  fi
fi
timeout ${TEST_TIMEOUT:-300} python3 -m pytest -m gpu -q -p no:cacheprovider ${GPU_TESTS:-tests/} \
  ${TESTS:+-k "$TESTS"} > "$OUT/pytest.txt" 2>&1
echo "pytest exit $?" | tee -a "$LOG"
grep -E "FAILED|ERROR|passed|failed" "$OUT/pytest.txt" | tail -30 | tee -a "$LOG"
