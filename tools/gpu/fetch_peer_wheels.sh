#!/usr/bin/env bash
# Downloads (here, where PyPI is reachable) the wheels of the bench's GPU
# peers that the GPU image lacks (tools/gpu/peer_wheels.txt) for the GPU
# machine's Python 3.12 / x86_64, into .whl/peers/, then packs them into
# bundles small enough to travel with one call each (split_wheels.sh).
#   bash tools/gpu/fetch_peer_wheels.sh
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
mkdir -p .whl/peers
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d .whl/peers \
  $(grep -v '^#' tools/gpu/peer_wheels.txt | grep .)
du -ch .whl/peers/*.whl | tail -1
bash tools/gpu/split_wheels.sh
