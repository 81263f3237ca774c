#!/usr/bin/env bash
# A/B timing of forward variants, kernel alone (no JAX), on one GPU:
#   bash tools/gpu/forward_ab.sh [VARIANT ...]
# Builds xla_ffi/tests/cuda_attention_bench.cu once with the tree's kernels
# ("tree") and once per VARIANT, then runs every binary on the same shapes,
# interleaved and twice, so that clock drift hits all alike. Each run also
# compares the forward it took with the mma.sync forward. A VARIANT is a .cu
# file taken in place of attention_sm90.cu (of attention_sm80.cu when its
# name holds "sm80"), or patches of that file joined by "+", applied in
# order to the tree's copy (e.g. tools/gpu/forward_probes/*.patch, or
# a.patch+b.patch for both). Every source compiles to its own object, all
# at once, and each binary links the objects it needs. Log:
# $OUT/forward_ab.txt. SHAPES ("batch seq heads dim causal;..."), LAUNCHES
# (default 20) and DATA (uniform or normal) override the runs; CHOICES
# (KernelChoice codes, default "0") runs each binary once per code, e.g.
# CHOICES="0 2" times the mma.sync forward beside auto. BUILD=only
# builds and stops, BUILD=no runs the binaries an earlier BUILD=only made
# (so that the builds can overlap another job's GPU runs).
source "$(dirname "$0")/common.sh"
LOG="$OUT/forward_ab.txt"
sm80=xla_ffi/cuda/attention_sm80.cu
sm90=xla_ffi/cuda/attention_sm90.cu
common=$(timer_sources_except $sm80 $sm90)
objects=/tmp/forward_ab_objects
build=${BUILD:-yes}
names=(tree)
# replaces_sm80 VARIANT: whether the variant stands in for attention_sm80.cu
# (the name of its first file holds "sm80") rather than attention_sm90.cu.
replaces_sm80() { [[ "$(basename "${1%%+*}")" == *sm80* ]]; }
# write_variant INDEX VARIANT: the variant's source as $objects/vINDEX.cu (a
# name of its own: one object per variant), a .cu copied or its patches
# applied in order to the tree's copy of the file they change; fails on a
# patch that does not apply.
write_variant() {
  local to=$objects/v$1.cu base=$sm90 patch
  if [[ $2 != *.patch* ]]; then
    cp "$2" "$to"
    return
  fi
  replaces_sm80 "$2" && base=$sm80
  cp "$base" "$to"
  IFS='+' read -ra patches <<< "$2"
  for patch in "${patches[@]}"; do
    patch --quiet --batch --no-backup-if-mismatch "$to" < "$patch" || { echo "$patch does not apply to $base" >&2; return 1; }
  done
}
if [[ $build != no ]]; then
  rm -rf "$objects" && mkdir -p "$objects"
  sources=($common $sm80 $sm90)
  index=0
  for variant in "$@"; do
    index=$((index + 1))
    write_variant $index "$variant" || exit 1
    sources+=("$objects/v$index.cu")
  done
  for source in "${sources[@]}"; do
    nvcc $timer_flags -c "$source" -o "$objects/$(basename "$source").o" 2>&1 | grep -v "^$" | tail -5 | tee -a "$LOG" &
  done
  wait
  common_objects=""
  for source in $common; do common_objects+=" $objects/$(basename "$source").o"; done
  nvcc $common_objects $objects/attention_sm80.cu.o $objects/attention_sm90.cu.o -o /tmp/forward_ab_tree &
  index=0
  for variant in "$@"; do
    index=$((index + 1))
    if replaces_sm80 "$variant"; then
      nvcc $common_objects $objects/v$index.cu.o $objects/attention_sm90.cu.o -o "/tmp/forward_ab_v$index" &
    else
      nvcc $common_objects $objects/attention_sm80.cu.o $objects/v$index.cu.o -o "/tmp/forward_ab_v$index" &
    fi
  done
  wait
fi
index=0
for variant in "$@"; do
  index=$((index + 1))
  names+=("v$index")
  [[ $build != only ]] && echo "v$index = $variant" | tee -a "$LOG"
done
[[ $build == only ]] && exit 0
# batch seq heads dim causal
default_shapes=("4 4096 32 128 0" "4 4096 32 128 1" "16 1024 32 128 1" "16 1024 32 128 0"
        "1 16384 32 128 1" "1 16384 32 128 0" "4 4096 32 64 0" "4 4096 32 64 1"
        "16 1024 32 64 1" "3 1000 32 128 1" "2 777 8 64 1" "2 777 8 64 0")
shapes=("${default_shapes[@]}")
[[ -n "${SHAPES:-}" ]] && IFS=';' read -ra shapes <<< "$SHAPES"
declare -A hung  # a binary that timed out once is not run again
for round in 1 2; do
  for shape in "${shapes[@]}"; do
    for name in "${names[@]}"; do
      for choice in ${CHOICES:-0}; do
        label=$name; [[ "${CHOICES:-0}" != 0 ]] && label="$name/choice$choice"
        [[ -n "${hung[$label]:-}" ]] && continue
        result=$(timeout 30 /tmp/forward_ab_$name $shape 64 fwd ${LAUNCHES:-20} ${DATA:-uniform} $choice)
        [[ $? == 124 ]] && { hung[$label]=1; result="TIMED OUT ($shape)"; }
        echo "$label $result" | tee -a "$LOG"
      done
    done
  done
done
