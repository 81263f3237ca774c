#!/usr/bin/env bash
# What a forward probe needs before it lands, in one run on one GPU:
#   DEADLINE=S bash tools/gpu/forward_probe_check.sh PATCH
# 1. forward_ab.sh: the tree against the tree with PATCH (a patch of
#    attention_sm90.cu, e.g. tools/gpu/forward_probes/*.patch), kernel
#    alone, normal data, on SHAPES (forward_ab.sh's format; default: no mask
#    and causal at D=128 and D=64, S = 1K and 4K, and a ragged shape).
# 2. compute-sanitizer memcheck and racecheck of the patched kernels on
#    SANITIZE_SHAPES ("batch seq heads dim causal;...", default ragged ones
#    at D=64 and D=128, no mask and causal).
# 3. PATCH applied to this working copy, the extension built for sm90a, and
#    the GPU tests that run the forward (tests/test_attention.py and
#    tests/test_gpu_kernels.py) in 16 shards until DEADLINE seconds (default
#    540) after the start.
# Logs in $OUT: forward_ab.txt, sanitizer.txt, suite_summary.txt,
# gpu_suite.txt (all shards' logs, one per test), log.txt (the build).
source "$(dirname "$0")/common.sh"
patch_file=${1:?usage: forward_probe_check.sh PATCH}
deadline=${DEADLINE:-540}
nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$OUT/sanitizer.txt"
BUILD=only bash "$(dirname "$0")/forward_ab.sh" "$patch_file" || exit 1
patch --quiet --batch --no-backup-if-mismatch xla_ffi/cuda/attention_sm90.cu < "$patch_file" || exit 1
build_extension "$OUT/log.txt"  # rebuilt even where the tree without PATCH was built before
echo "(build done: $SECONDS s)" | tee -a "$OUT/sanitizer.txt"
DATA=normal BUILD=no SHAPES="${SHAPES:-16 1024 32 128 0;16 1024 32 128 1;4 4096 32 128 0;4 4096 32 128 1;16 1024 32 64 0;16 1024 32 64 1;4 4096 32 64 0;4 4096 32 64 1;2 777 8 64 0}" \
  bash "$(dirname "$0")/forward_ab.sh" "$patch_file" > /dev/null
echo "(A/B done: $SECONDS s)" | tee -a "$OUT/sanitizer.txt"
IFS=';' read -ra sanitize_shapes <<< "${SANITIZE_SHAPES:-2 777 8 64 0;2 777 8 64 1;1 1000 4 128 0;1 1000 4 128 1}"
for shape in "${sanitize_shapes[@]}"; do
  for tool in memcheck racecheck; do
    sanitize "$OUT/sanitizer.txt" " ($shape)" 60 $tool /tmp/forward_ab_v1 $shape 64 fwd 1 normal 0
  done
done
left=$((deadline - SECONDS))
if ((left > 60)); then
  XLA_FLAGS="--xla_gpu_autotune_level=0" SHARDS=16 TEST_TIMEOUT=$((left - 20)) timeout $left \
    bash "$(dirname "$0")/pytest_shards.sh" tests/test_attention.py tests/test_gpu_kernels.py > "$OUT/suite_summary.txt" 2>&1
  gather_shard_logs
  rm -f "$OUT/test_ids.txt"
fi
echo "(end: $SECONDS s)" | tee -a "$OUT/sanitizer.txt"
