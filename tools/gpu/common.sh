# Sourced by the tools/gpu/*.sh device scripts: output folder, the wheels that
# travel in .whl/ (the GPU machine has no index), PYTHONPATH, build log.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}

# build_extension LOG: the in-place build for sm90a, its tail in LOG on failure.
build_extension() {
  FASTATTN_CUDA_ARCHS=90a python3 setup.py build_ext --inplace > /tmp/build.log 2>&1 || {
    tail -40 /tmp/build.log | tee -a "$1"
    exit 1
  }
}

# The standalone timer of the attention kernels (no JAX): its driver and the
# kernel sources it links, and the flags every build of it uses (sm90a).
timer_flags="-std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a --use_fast_math -Ixla_ffi -Ixla_ffi/cuda"
timer_driver="xla_ffi/tests/cuda_attention_bench.cu xla_ffi/cuda/dispatch.cc"
timer_kernels="xla_ffi/cuda/attention_sm80.cu xla_ffi/cuda/attention_sm90.cu \
  xla_ffi/cuda/attention_backward_sm80.cu xla_ffi/cuda/attention_backward_sm90.cu"
# timer_sources_except FILE...: the driver and the kernel sources but FILE
# (which an A/B variant stands in for).
timer_sources_except() {
  local source keep=$timer_driver
  for source in $timer_kernels; do
    [[ " $* " == *" $source "* ]] || keep+=" $source"
  done
  echo "$keep"
}

# build_attention_timer LOG: the timer with the tree's kernels at
# /tmp/attention_bench, the tail of nvcc's output in LOG.
build_attention_timer() {
  nvcc $timer_flags $timer_driver $timer_kernels -o /tmp/attention_bench 2>&1 | tail -5 | tee -a "$1"
}

# sanitize LOG LABEL TIMEOUT TOOL COMMAND...: COMMAND under compute-sanitizer
# TOOL (memcheck, racecheck), its exit status and summary line in LOG, then
# its first findings.
sanitize() {
  local log=$1 label=$2 limit=$3 tool=$4
  shift 4
  timeout $limit compute-sanitizer --tool $tool --error-exitcode 9 "$@" > /tmp/sanitizer_$tool.txt 2>&1
  echo "compute-sanitizer $tool$label: exit $?; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' /tmp/sanitizer_$tool.txt | tail -1)" \
    | tee -a "$log"
  grep -m5 -E "Invalid|Race|hazard" /tmp/sanitizer_$tool.txt | tee -a "$log"
}

# gather_shard_logs: pytest_shards.sh's per-shard logs joined into
# $OUT/gpu_suite.txt (the device tool brings back only a few files).
gather_shard_logs() {
  for f in "$OUT"/pytest_shard*.txt; do echo "== $f"; cat "$f"; echo; done > "$OUT/gpu_suite.txt"
  rm -f "$OUT"/pytest_shard*.txt
}

# cuda_decode_kernel_test LOG [plain|sanitize|both]: builds xla_ffi/tests/cuda_decode_test.cu
# (both CUDA decode kernels against the CPU kernel) and runs it plainly, under
# compute-sanitizer memcheck and racecheck, or both (the default), each line in LOG.
cuda_decode_kernel_test() {
  local runs=${2:-both}
  nvcc -std=c++17 -O2 -gencode arch=compute_90a,code=sm_90a -Ixla_ffi -Xcompiler -march=native \
    xla_ffi/tests/cuda_decode_test.cu xla_ffi/cuda/decode_sm80.cu xla_ffi/cuda/decode_mma_sm80.cu \
    xla_ffi/cpu/decode.cc xla_ffi/common/thread_pool.cc -o /tmp/cuda_decode_test 2>&1 | grep -v warning | tee -a "$1"
  if [ "$runs" != sanitize ]; then timeout 120 /tmp/cuda_decode_test 2>&1 | tee -a "$1"; fi
  if [ "$runs" = plain ]; then return; fi
  for tool in memcheck racecheck; do sanitize "$1" "" 240 $tool /tmp/cuda_decode_test; done
}
