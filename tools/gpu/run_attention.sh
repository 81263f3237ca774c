#!/usr/bin/env bash
# GPU checks of the attention kernels ("cuda" sm80+ and "volta") in one call:
# build, pytest -m gpu on $GPU_TESTS (default: every test; -k $TESTS when set),
# compute-sanitizer on a small forward + backward case, then a side-by-side
# benchmark (arguments go to the bench; BENCH2 holds a second argument list).
# Log: $OUT/attention.txt; bench JSON/PNG under $OUT/bench.
source "$(dirname "$0")/common.sh"
LOG="$OUT/attention.txt"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
python3 -c "import jax, torch; print('jax', jax.__version__, 'torch', torch.__version__)" 2>&1 | tee -a "$LOG"
build_extension "$LOG"
python3 -c "from jax_fastattn import ffi; print('targets', sorted(ffi.cuda_targets()))" 2>&1 | tee -a "$LOG"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  # Written straight into $OUT, so that a run cut by the device tool's limit
  # still brings back which tests passed (keep TEST_TIMEOUT below that limit).
  timeout ${TEST_TIMEOUT:-360} python3 -m pytest -m gpu -v -p no:cacheprovider -x ${GPU_TESTS:-tests/} ${TESTS:+-k "$TESTS"} > "$OUT/pytest.txt" 2>&1
  TEST_STATUS=$?
  grep -E "FAILED|ERROR|passed|failed" "$OUT/pytest.txt" | tail -40 | tee -a "$LOG"
  if [ $TEST_STATUS -ne 0 ] && [ "${BENCH_ANYWAY:-0}" != 1 ]; then echo "tests failed: no sanitizer, no bench" | tee -a "$LOG"; exit 1; fi
  cat > /tmp/small_cuda.py <<'PY'
import jax, jax.numpy as jnp
from jax_fastattn import flash_attention
q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (1, 200, 2, 128), jnp.bfloat16) for i in range(3))
print(flash_attention(q, k, v, causal=True, backend="cuda").block_until_ready().shape)
loss = lambda q, k, v: flash_attention(q, k, v, causal=True, backend="cuda").astype(jnp.float32).sum()
print([g.shape for g in jax.block_until_ready(jax.grad(loss, (0, 1, 2))(q, k, v))])
PY
  for tool in memcheck racecheck; do
    timeout 200 compute-sanitizer --tool $tool --error-exitcode 9 python3 /tmp/small_cuda.py > /tmp/sanitizer_$tool.txt 2>&1
    echo "compute-sanitizer $tool (cuda forward + backward): exit $?; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' /tmp/sanitizer_$tool.txt | tail -1)" | tee -a "$LOG"
  done
fi
if [ $# -gt 0 ]; then
  timeout ${BENCH_TIMEOUT:-420} python3 -m jax_fastattn.bench --backend cuda --out "$OUT/bench" "$@" 2>&1 | grep -v "^running" | tail -40 | tee -a "$LOG"
fi
if [ -n "${BENCH2:-}" ]; then
  timeout ${BENCH_TIMEOUT:-420} python3 -m jax_fastattn.bench --backend cuda --out "$OUT/bench2" $BENCH2 2>&1 | grep -v "^running" | tail -40 | tee -a "$LOG"
fi
