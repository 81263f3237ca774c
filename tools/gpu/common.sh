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
