#!/usr/bin/env bash
# GPU check of the sm90a forward in CTA pairs (KernelConfig(cuda_forward=
# "wgmma_cluster"), KernelChoice code 5): builds the extension and the
# standalone timer side by side; a smoke run (a hang or failure ends the
# check there); compute-sanitizer memcheck and racecheck of the standalone
# forward (SANITIZE=0 skips); kernel-alone timing of code 5 against auto (0)
# at D=128 with no mask, S = 1K, 4K, 16K, interleaved, two rounds, each run
# also comparing its output with the mma.sync forward (TIMING=0 skips);
# the GPU tests of the cluster forward (pytest -m gpu -k cluster); and with
# BENCH=1 the bench beside cuDNN. Log: $OUT/sm90_cluster.txt.
#   bash tools/gpu/sm90_cluster_check.sh
source "$(dirname "$0")/common.sh"
LOG="$OUT/sm90_cluster.txt"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
(build_extension "$OUT/build_failed.txt") &
BUILD=$!
build_attention_timer "$LOG"
# Arguments: batch seq heads dim causal tile_q fwd launches data choice.
for shape in "2 1024 8 128 0" "1 256 2 128 0" "3 2000 4 128 0"; do
  timeout 30 /tmp/attention_bench $shape 64 fwd 1 uniform 5 2>&1 | tee -a "$LOG"
  status=${PIPESTATUS[0]}
  [ "$status" = 0 ] || { echo "smoke run ($shape): exit $status" | tee -a "$LOG"; kill $BUILD; exit 1; }
done
if [ "${SANITIZE:-1}" = 1 ]; then
  for tool in memcheck racecheck; do
    timeout 240 compute-sanitizer --tool $tool --error-exitcode 9 /tmp/attention_bench 2 1024 4 128 0 64 fwd 1 uniform 5 \
      > /tmp/sanitizer_$tool.txt 2>&1
    echo "compute-sanitizer $tool (B2 S1024 H4 D128 full, code 5): exit $?; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' \
      /tmp/sanitizer_$tool.txt | tail -1)" | tee -a "$LOG"
  done
fi
if [ "${TIMING:-1}" = 1 ]; then
  for round in 1 2; do
    for shape in "16 1024 32 128 0" "4 4096 32 128 0" "1 16384 32 128 0"; do
      for choice in 0 5; do
        echo "round $round choice $choice: $(timeout 60 /tmp/attention_bench $shape 64 fwd 20 uniform $choice 2>&1 | tr '\n' ' ')" \
          | tee -a "$LOG"
      done
    done
  done
fi
wait $BUILD || { cat "$OUT/build_failed.txt" | tee -a "$LOG"; exit 1; }
timeout ${TEST_TIMEOUT:-300} python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu_kernels.py -k cluster 2>&1 \
  | tail -15 | tee -a "$LOG"
if [ "${BENCH:-0}" = 1 ]; then
  timeout 300 python3 -m jax_fastattn.bench --backend cuda --dtype bfloat16 --heads 32 --tokens 16384 --repeats 12 \
    --head-dim 128 --seq 1024 4096 16384 --no-causal --impls fastattn-cuda fastattn-cuda-cluster jax.nn-cudnn torch-cudnn \
    --budget 240 --out "$OUT/bench_cluster" 2>&1 | grep -v "^running" | tee -a "$LOG"
fi
