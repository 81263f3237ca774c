#!/usr/bin/env bash
# Everything the GPU machine checks, in one call (device time is scarce):
# build with nvcc, the plain CUDA kernel test (also under compute-sanitizer
# memcheck and racecheck), `pytest -m gpu`, then the benchmarks. Results go
# to $OUT (or ./gpu_out). Wheels missing there travel in .whl/.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices()); print('torch', torch.__version__)" | tee -a "$OUT/device.txt"

FASTATTN_CUDA_ARCHS=90a python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
nvcc -std=c++17 -O2 -gencode arch=compute_90a,code=sm_90a -Ixla_ffi -Xcompiler -march=native \
  xla_ffi/tests/cuda_decode_test.cu xla_ffi/cuda/decode_sm80.cu xla_ffi/cpu/decode.cc xla_ffi/common/thread_pool.cc \
  -o /tmp/cuda_decode_test && /tmp/cuda_decode_test | tee "$OUT/cuda_decode_test.txt"
for tool in memcheck racecheck; do
  compute-sanitizer --tool $tool --error-exitcode 9 /tmp/cuda_decode_test > "$OUT/sanitizer_$tool.txt" 2>&1
  echo "compute-sanitizer $tool exit $?: $(tail -1 "$OUT/sanitizer_$tool.txt")" | tee -a "$OUT/sanitizers.txt"
done
python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu_decode.py 2>&1 | tail -15 | tee "$OUT/pytest_gpu.txt"
