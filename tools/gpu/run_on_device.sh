#!/usr/bin/env bash
# Everything the GPU machine checks, in one call (device time is scarce):
# build with nvcc, the plain CUDA kernel test (also under compute-sanitizer
# memcheck and racecheck), `pytest -m gpu`. Log: $OUT/log.txt (or
# ./gpu_out). Wheels missing there travel in .whl/ (see the device tool).
source "$(dirname "$0")/common.sh"
LOG="$OUT/log.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$LOG"
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices()); print('torch', torch.__version__)" 2>&1 | tee -a "$LOG"
nvcc --version | tail -1 | tee -a "$LOG"

build_extension "$LOG"
echo "build ok" | tee -a "$LOG"
nvcc -std=c++17 -O2 -gencode arch=compute_90a,code=sm_90a -Ixla_ffi -Xcompiler -march=native \
  xla_ffi/tests/cuda_decode_test.cu xla_ffi/cuda/decode_sm80.cu xla_ffi/cuda/decode_mma_sm80.cu xla_ffi/cpu/decode.cc \
  xla_ffi/common/thread_pool.cc \
  -o /tmp/cuda_decode_test 2>&1 | tee -a "$LOG"
timeout 120 /tmp/cuda_decode_test 2>&1 | tee -a "$LOG"
for tool in memcheck racecheck; do
  timeout 240 compute-sanitizer --tool $tool --error-exitcode 9 /tmp/cuda_decode_test > /tmp/sanitizer_$tool.txt 2>&1
  echo "compute-sanitizer $tool: exit $?; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' /tmp/sanitizer_$tool.txt | tail -1)" | tee -a "$LOG"
done
timeout 400 python3 -m pytest -m gpu -q -p no:cacheprovider -x "${@:-tests/test_gpu_decode.py}" 2>&1 | tail -15 | tee -a "$LOG"
