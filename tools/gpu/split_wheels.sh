#!/usr/bin/env bash
# Packs .whl/peers/*.whl into bundles .whl/peers-1/, .whl/peers-2/, ... of at
# most MAX_MIB each (default 56: one call carries at most 64 MiB in all),
# cutting wheels larger than PART_MIB (default 45) into numbered parts with
# `split`; install_peer_wheels.sh joins them with `cat`. Each bundle holds
# the SHA256SUMS of the whole wheels, so a joined wheel can be checked.
#   bash tools/gpu/split_wheels.sh
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PART_MIB=${PART_MIB:-45}
MAX_MIB=${MAX_MIB:-56}
rm -rf .whl/peers-* .whl/parts
mkdir -p .whl/parts
(cd .whl/peers && sha256sum *.whl) > .whl/parts/SHA256SUMS
for wheel in .whl/peers/*.whl; do
  if (( $(stat -c %s "$wheel") > PART_MIB * 1048576 )); then
    split -b "${PART_MIB}M" -d -a 2 "$wheel" ".whl/parts/$(basename "$wheel").part-"
  else
    cp "$wheel" .whl/parts/
  fi
done
# First fit, largest first.
declare -a used=()
for item in $(ls -S .whl/parts | grep -v SHA256SUMS); do
  size=$(stat -c %s ".whl/parts/$item")
  bundle=-1
  for i in "${!used[@]}"; do
    if (( used[i] + size <= MAX_MIB * 1048576 )); then bundle=$i; break; fi
  done
  if (( bundle < 0 )); then bundle=${#used[@]}; used[bundle]=0; fi
  used[bundle]=$(( used[bundle] + size ))
  mkdir -p ".whl/peers-$((bundle + 1))"
  mv ".whl/parts/$item" ".whl/peers-$((bundle + 1))/"
done
for i in "${!used[@]}"; do
  cp .whl/parts/SHA256SUMS ".whl/peers-$((i + 1))/"
  echo ".whl/peers-$((i + 1)): $(( used[i] / 1048576 )) MiB, $(ls ".whl/peers-$((i + 1))" | wc -l) files"
done
rm -rf .whl/parts
