#!/usr/bin/env bash
# Device-machine stages, run in order within one call: bash tools/gpu/stages.sh STAGE ...
#   build   the extension for sm90a (skipped when this machine already built it)
#   suite   the GPU test suite, unfiltered (pytest -m gpu over tests/), sharded over processes
#   config  tools/gpu/kernel_config_check.py (each KernelConfig choice against a reference)
#   bench   ours vs cuDNN (jax, torch), FlashAttention-2 and XLA: forward causal/full and
#           forward+backward causal at S = 4K and 16K, bf16, H=32, D=128, B*S = 16K
#   llama   tools/gpu/llama_bench.py (LLAMA_CASES selects cases)
#   weights tools/gpu/decode_weight_stream.py (weight streaming: scanned vs unrolled layers vs a copy)
#   tp      tools/gpu/tp_block_model.py and tools/gpu/tp_schedule.py (deviceless 2/8-H100 schedules)
#   ring    tools/gpu/ring_step_time.py and tools/gpu/ring_schedule.py (deviceless 4/8-H100 schedules)
#   offload tools/gpu/offload_bench.py (OFFLOAD_ARGS: extra arguments, OFFLOAD_TAG: suffix of its JSON)
#   trtvit  python -m models.trt_vit.bench (latency table and guideline experiments)
#   cpubench the CPU grid of issue 32 on this host's CPU (ours, torch SDPA, XLA interleaved) at all its
#           cores and at 2 (CPU_THREADS overrides the list), no GPU involved (the bench's worker pins
#           jax to the CPU platform)
#   decode  the CUDA decode kernels: the plain kernel test (both kernels against the CPU kernel),
#           the GPU decode tests, then the three decode cases with ours (the default, tensor
#           cores where they run; the CUDA-core kernel), cuDNN and a device copy
#   splits  tools/gpu/decode_splits.py (the tensor-core decode kernel's split counts against cuDNN)
#   sanitize the plain decode kernel test under compute-sanitizer memcheck and racecheck
#   hostkv  Llama-3-8B decode with part of a 64K-token KV cache in host memory vs all on the device
# Logs and JSON under $OUT (a few files, as the device tool brings back at most 8).
source "$(dirname "$0")/common.sh"
LOG="$OUT/log.txt"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
stage_time() { echo "($1: $((SECONDS - $2)) s)" | tee -a "$LOG"; }
for stage in "$@"; do
  start=$SECONDS
  echo "== $stage $(date -u +%H:%M:%S)" | tee -a "$LOG"
  case $stage in
    build)
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
      python3 -c "import jax, jaxlib, torch; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'torch', torch.__version__, jax.devices())" 2>&1 | tee -a "$LOG"
      if ! python3 -c "from jax_fastattn import ffi; assert 'fastattn_forward_cuda' in ffi.cuda_targets()" 2>/dev/null; then
        build_extension "$LOG"
      fi
      python3 -c "from jax_fastattn import ffi; print('cuda targets', sorted(ffi.cuda_targets()))" 2>&1 | tee -a "$LOG" ;;
    suite)
      # No XLA autotuning: the tests time nothing (533 tests in 155 s on an H100 without it).
      XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" SHARDS=${SHARDS:-16} TEST_TIMEOUT=${TEST_TIMEOUT:-400} \
        bash "$(dirname "$0")/pytest_shards.sh" tests/ 2>&1 | tee -a "$LOG"
      gather_shard_logs
      grep -c "^FAILED-NOW" "$OUT/gpu_suite.txt" | sed 's/^/failures reported: /' | tee -a "$LOG" ;;
    config)
      timeout ${CONFIG_TIMEOUT:-240} python3 tools/gpu/kernel_config_check.py --size full --out "$OUT/kernel_config.json" 2>&1 \
        | tail -30 | tee -a "$LOG" ;;
    bench)
      timeout 420 python3 -m jax_fastattn.bench --backend cuda --dtype bfloat16 --heads 32 --tokens 16384 --repeats 12 \
        --head-dim 128 --seq 4096 16384 --impls fastattn-cuda jax.nn-cudnn torch-cudnn torch-flash --budget 200 \
        --out "$OUT/bench_fwd_causal" 2>&1 | grep -v "^running" | tee -a "$LOG"
      timeout 300 python3 -m jax_fastattn.bench --backend cuda --dtype bfloat16 --heads 32 --tokens 16384 --repeats 12 \
        --head-dim 128 --seq 4096 16384 --no-causal --impls fastattn-cuda jax.nn-cudnn torch-cudnn torch-flash --budget 150 \
        --out "$OUT/bench_fwd_full" 2>&1 | grep -v "^running" | tee -a "$LOG"
      timeout 300 python3 -m jax_fastattn.bench --backend cuda --dtype bfloat16 --heads 32 --tokens 16384 --repeats 12 \
        --head-dim 128 --seq 4096 16384 --mode fwd_bwd --impls fastattn-cuda jax.nn-cudnn torch-cudnn torch-flash --budget 150 \
        --out "$OUT/bench_fwdbwd_causal" 2>&1 | grep -v "^running" | tee -a "$LOG"
      tar czf "$OUT/bench.tgz" -C "$OUT" bench_fwd_causal bench_fwd_full bench_fwdbwd_causal && \
        rm -rf "$OUT"/bench_fwd_causal "$OUT"/bench_fwd_full "$OUT"/bench_fwdbwd_causal ;;
    llama)
      timeout 500 python3 tools/gpu/llama_bench.py --out "$OUT/llama.json" ${LLAMA_CASES:+--cases $LLAMA_CASES} \
        --budget-s ${LLAMA_BUDGET:-300} ${LLAMA_STORAGE:+--layer-storage $LLAMA_STORAGE} ${LLAMA_ATTENTION:+--attention $LLAMA_ATTENTION} 2>&1 | tail -40 | tee -a "$LOG" ;;
    weights)
      timeout 240 python3 tools/gpu/decode_weight_stream.py --out "$OUT/decode_weight_stream.json" 2>&1 | tail -8 | tee -a "$LOG" ;;
    tp)
      timeout 240 python3 tools/gpu/tp_block_model.py --out "$OUT/tp_model.json" --budget-s 120 2>&1 | tail -30 | tee -a "$LOG"
      timeout 200 python3 tools/gpu/tp_schedule.py --check --child-timeout 90 --out "$OUT/tp_schedule.json" 2>&1 | tail -30 | tee -a "$LOG" ;;
    ring)
      timeout 240 python3 tools/gpu/ring_step_time.py --preset h200 --out "$OUT/ring_steps.json" 2>&1 | tail -30 | tee -a "$LOG"
      timeout 300 python3 tools/gpu/ring_schedule.py --check --out "$OUT/ring_schedule.json" 2>&1 | tail -6 | tee -a "$LOG" ;;
    offload)
      timeout ${OFFLOAD_TIMEOUT:-420} python3 tools/gpu/offload_bench.py --preset ${OFFLOAD_PRESET:-h200} ${OFFLOAD_ARGS:-} \
        --out "$OUT/offload${OFFLOAD_TAG:-}.json" 2>&1 \
        | tail -40 | tee -a "$LOG" ;;
    trtvit)
      timeout 420 python3 -m models.trt_vit.bench --dtypes bf16,fp16 --out "$OUT/trt_vit_models.json" 2>&1 | tail -40 | tee -a "$LOG"
      timeout 300 python3 -m models.trt_vit.bench --experiments guidelines --dtypes bf16 --out "$OUT/trt_vit_guidelines.json" 2>&1 \
        | tail -40 | tee -a "$LOG" ;;
    cpubench)
      lscpu | grep -E "Model name|^CPU\(s\)|Flags" | cut -c1-400 | tee -a "$LOG"
      for threads in ${CPU_THREADS:-$(nproc) 2}; do
        timeout ${CPU_BENCH_TIMEOUT:-400} bash tools/cpu_bench.sh "$threads" "$OUT/cpu_t$threads" 2>&1 \
          | grep -v "^running" | tail -32 | tee -a "$LOG"
      done ;;
    decode)
      cuda_decode_kernel_test "$LOG" plain
      timeout 240 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu_decode.py 2>&1 | tail -8 | tee -a "$LOG"
      DECODE_PEERS="memcpy-device fastattn-cuda fastattn-cuda-simt jax.nn-cudnn" DEADLINE_S=${DECODE_BENCH_S:-200} \
        bash "$(dirname "$0")/bench_peers.sh" decode-b8 decode-b1 decode-b32 2>&1 | tail -30 | tee -a "$LOG" ;;
    splits)
      PYTHONPATH=. timeout 200 python3 tools/gpu/decode_splits.py --repeats 25 --out "$OUT/decode_splits.json" 2>&1 \
        | grep -v Warn | tail -40 | tee -a "$LOG" ;;
    sanitize)
      cuda_decode_kernel_test "$LOG" sanitize ;;
    hostkv)
      for mode in device host; do
        timeout 300 python3 -m models.llama --config llama3-8b --batch 1 --prompt-len 65536 --gen 32 --kv-cache $mode \
          --device-kv-tokens 16384 --json "$OUT/llama_${mode}kv.json" 2>&1 | tail -8 | tee -a "$LOG"
      done ;;
    *) echo "unknown stage $stage" | tee -a "$LOG"; exit 2 ;;
  esac
  stage_time "$stage" "$start"
done
