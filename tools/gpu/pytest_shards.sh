#!/usr/bin/env bash
# Runs `pytest -m gpu ARGS` as SHARDS processes side by side on the one GPU
# (the tests are mostly XLA compilation, which is CPU-bound and serial per
# process): test ids split round-robin, logs $OUT/pytest_shard*.txt, and a
# summary line per shard. SKIP_FIRST=N drops the first N ids (already run);
# IDS_FILE=path runs exactly the ids listed there (one per line) instead of
# collecting (tools/gpu/suite_rest.py lists the ids a cut-short run did not
# finish). Each shard logs one line per test (-v), so a shard stopped at
# TEST_TIMEOUT still says which tests ran.
source "$(dirname "$0")/common.sh"
SHARDS=${SHARDS:-4}
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# FILTER: an extended regex the test ids must match (default: all).
if [ -n "${IDS_FILE:-}" ]; then
  grep "::" "$IDS_FILE" > /tmp/test_ids.txt
else
  python3 -m pytest -m gpu --collect-only -q -p no:cacheprovider "$@" 2>/dev/null | grep "::" \
    | grep -E "${FILTER:-.}" | tail -n +$(( ${SKIP_FIRST:-0} + 1 )) > /tmp/test_ids.txt
fi
cp /tmp/test_ids.txt "$OUT/test_ids.txt"
echo "$(wc -l < /tmp/test_ids.txt) tests in $SHARDS shards"
for shard in $(seq 0 $((SHARDS - 1))); do
  awk -v n=$SHARDS -v s=$shard 'NR % n == s' /tmp/test_ids.txt > /tmp/ids_$shard.txt
  PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/tools/gpu:$PYTHONPATH timeout ${TEST_TIMEOUT:-420} python3 -m pytest -m gpu -v -p no:cacheprovider \
    -p instafail $(cat /tmp/ids_$shard.txt) \
    > "$OUT/pytest_shard$shard.txt" 2>&1 &
done
wait
for shard in $(seq 0 $((SHARDS - 1))); do
  echo "shard $shard: $(grep -E "passed|failed|error" "$OUT/pytest_shard$shard.txt" | tail -1)"
  grep -E "^(FAILED|ERROR)" "$OUT/pytest_shard$shard.txt" | head -10
done
