#!/usr/bin/env bash
# The attention benchmark tables of docs/BENCHMARKS.md, every implementation
# of a group in the same invocation (ours, cuDNN through jax and torch,
# tokamax, FlashAttention-4, FlashAttention-2; PEERS / DECODE_PEERS override
# the lists), bf16, Hq = 32, B·S = 16K tokens, 12 samples of 10
# back-to-back calls each:
#   bash tools/gpu/install_peer_wheels.sh && source /tmp/site/peers.env   # tokamax, fa4
#   bash tools/gpu/bench_peers.sh GROUP ...      # groups below; default: all
# Results: $OUT/bench/GROUP/{results.json,plot.png}, tables in $OUT/bench.txt.
# DEADLINE_S (default 540): seconds for the whole script; a group gets what
# is left as the bench's --budget (later workers skipped, the running one
# cut), so that one device call of 600 s still brings its results back.
# PACK=1: the per-group folders end up in one $OUT/bench_<first group>.tgz
# (fewer files to bring back). SMALL=1: the same groups at toy sizes on the
# CPU backend (a dry run).
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT/bench"
PEERS=${PEERS:-"fastattn-cuda jax.nn-cudnn torch-cudnn tokamax fa4 torch-flash"}
DECODE_PEERS=${DECODE_PEERS:-"memcpy-device fastattn-cuda jax.nn-cudnn jax.nn-xla"}
COMMON="--backend cuda --dtype bfloat16 --heads 32 --tokens 16384 --repeats 12 --timeout 300"
if [[ "${SMALL:-0}" == 1 ]]; then
  COMMON="--backend cpu --dtype float32 --heads 4 --tokens 256 --repeats 5 --timeout 300"
  PEERS="fastattn-xla reference"
  DECODE_PEERS="memcpy-numpy fastattn-xla jax.nn-xla"
fi
declare -A CASE_ARGS=(
  [fwd-causal]="--head-dim 128 --seq 1024 4096 16384"
  [fwd-full]="--head-dim 128 --seq 1024 4096 16384 --no-causal"
  [fwd-gqa]="--head-dim 128 --seq 4096 --kv-heads 8 --no-causal"
  [fwd-d64-causal]="--head-dim 64 --seq 4096"
  [fwd-d64-full]="--head-dim 64 --seq 4096 --no-causal"
  [fwdbwd-causal]="--head-dim 128 --seq 1024 4096 16384 --mode fwd_bwd"
  [fwdbwd-full]="--head-dim 128 --seq 4096 16384 --no-causal --mode fwd_bwd"
  [fwdbwd-gqa]="--head-dim 128 --seq 4096 --kv-heads 8 --mode fwd_bwd"
  [fwdbwd-d64]="--head-dim 64 --seq 4096 --mode fwd_bwd"
  # Decode: one token per row against a full cache, Hq/Hkv = 32/8, D=128.
  [decode-b8]="--mode decode --no-causal --tokens 0 --batch 8 --seq 32768 --kv-heads 8 --head-dim 128"
  [decode-b1]="--mode decode --no-causal --tokens 0 --batch 1 --seq 131072 --kv-heads 8 --head-dim 128"
  [decode-b32]="--mode decode --no-causal --tokens 0 --batch 32 --seq 8192 --kv-heads 8 --head-dim 128"
)
ORDER="fwd-causal fwd-full fwd-gqa fwd-d64-causal fwd-d64-full fwdbwd-causal fwdbwd-full fwdbwd-gqa fwdbwd-d64
  decode-b8 decode-b1 decode-b32"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$OUT/bench.txt" || true
for group in ${@:-$ORDER}; do
  [[ -n "${CASE_ARGS[$group]:-}" ]] || { echo "unknown group $group (groups: $ORDER)"; exit 2; }
  SEQ_ARGS=${CASE_ARGS[$group]}
  [[ "${SMALL:-0}" == 1 ]] && SEQ_ARGS=$(echo "$SEQ_ARGS" | sed -E 's/--seq [0-9 ]+/--seq 64 128 /; s/--head-dim [0-9]+/--head-dim 16/; s/--kv-heads 8/--kv-heads 2/; s/--batch [0-9]+/--batch 2/')
  echo "== $group: $SEQ_ARGS" | tee -a "$OUT/bench.txt"
  start=$SECONDS
  left=$(( ${DEADLINE_S:-540} - SECONDS ))
  (( left >= 30 )) || { echo "($group: not run, ${left}s left of DEADLINE_S)" | tee -a "$OUT/bench.txt"; continue; }
  impls=$PEERS
  [[ "$group" == decode-* ]] && impls=$DECODE_PEERS
  python3 -m jax_fastattn.bench $COMMON $SEQ_ARGS --impls $impls --budget $left --out "$OUT/bench/$group" 2>&1 \
    | grep -v "^running" | tee -a "$OUT/bench.txt"
  echo "($group: $((SECONDS - start)) s)" | tee -a "$OUT/bench.txt"
done
if [[ "${PACK:-0}" == 1 ]]; then
  first=(${@:-$ORDER})
  tar czf "$OUT/bench_${first[0]}.tgz" -C "$OUT" bench && rm -rf "$OUT/bench" && echo "packed $OUT/bench_${first[0]}.tgz"
fi
