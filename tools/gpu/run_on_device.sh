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
cuda_decode_kernel_test "$LOG"
timeout 400 python3 -m pytest -m gpu -q -p no:cacheprovider -x "${@:-tests/test_gpu_decode.py}" 2>&1 | tail -15 | tee -a "$LOG"
