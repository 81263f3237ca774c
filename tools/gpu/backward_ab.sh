#!/usr/bin/env bash
# A/B timing of sm90 backward variants, kernel alone (no JAX), on one GPU:
#   bash tools/gpu/backward_ab.sh [VARIANT.cu ...]
# Builds xla_ffi/tests/cuda_attention_bench.cu once with the tree's kernels
# ("tree") and once with each VARIANT.cu in place of
# attention_backward_sm90.cu (e.g. `git show REF:xla_ffi/cuda/attention_backward_sm90.cu
# > abv/old.cu` before the device call, the folder carried), then runs every
# binary with every backward choice on the same shapes, interleaved, so that
# clock drift hits all alike. Each run also compares dQ, dK, dV with the
# mma.sync backward's. SANITIZE=1 adds compute-sanitizer memcheck and
# racecheck of the tree's one-pass kernels on a small ragged shape. Log:
# $OUT/backward_ab.txt. SHAPES ("batch seq heads dim causal;..."), CHOICES
# (KernelChoice codes; default "1 3 4": two passes, ordered, atomic),
# LAUNCHES (default 20), ROUNDS (default 1) override the runs.
source "$(dirname "$0")/common.sh"
LOG="$OUT/backward_ab.txt"
sm90_backward=xla_ffi/cuda/attention_backward_sm90.cu
common=$(timer_sources_except $sm90_backward)
names=(tree)
nvcc $timer_flags $common $sm90_backward -o /tmp/backward_ab_tree &
index=0
for variant in "$@"; do
  index=$((index + 1))
  names+=("v$index")
  echo "v$index = $variant" | tee -a "$LOG"
  nvcc $timer_flags $common "$variant" -o "/tmp/backward_ab_v$index" &
done
wait
# batch seq heads dim causal
default_shapes=("4 4096 32 128 1" "4 4096 32 128 0" "1 16384 32 128 1" "4 4096 32 64 1" "4 4096 32 64 0"
        "1 16384 32 64 1" "2 777 8 64 1")
shapes=("${default_shapes[@]}")
[[ -n "${SHAPES:-}" ]] && IFS=';' read -ra shapes <<< "$SHAPES"
declare -A hung  # a binary that timed out once is not run again (a stalled chain of turns)
for round in $(seq 1 "${ROUNDS:-1}"); do
  for shape in "${shapes[@]}"; do
    for choice in ${CHOICES:-1 3 4}; do
      for name in "${names[@]}"; do
        [[ -n "${hung[$name]:-}" ]] && continue
        result=$(timeout 60 /tmp/backward_ab_$name $shape 64 bwd ${LAUNCHES:-20} uniform $choice | tr '\n' ' ')
        [[ $? == 124 ]] && { hung[$name]=1; result="TIMED OUT"; }
        echo "$name choice $choice [$shape]: $result" | tee -a "$LOG"
      done
    done
  done
done
if [ "${SANITIZE:-0}" = 1 ]; then
  for tool in memcheck racecheck; do
    for choice in 3 4; do
      for dim in 128 64; do
        sanitize "$LOG" " choice $choice D=$dim" 150 $tool /tmp/backward_ab_tree 1 700 4 $dim 1 64 bwd 1 \
          uniform $choice
      done
    done
  done
fi
