#!/usr/bin/env bash
# Joins the bundles .whl/peers-*/ (split_wheels.sh) into whole wheels in DEST
# (default /tmp/peer_wheels): parts NAME.part-00, -01, ... are concatenated
# in order with `cat`, then every wheel is checked against SHA256SUMS.
# Exits 1 naming the wheels that are missing (a bundle not carried yet) or
# damaged.
#   bash tools/gpu/join_wheels.sh [DEST]
set -uo pipefail
DEST=${1:-/tmp/peer_wheels}
mkdir -p "$DEST"
shopt -s nullglob
bundles=(.whl/peers-*/)
(( ${#bundles[@]} )) || { echo "no .whl/peers-*/ bundles here"; exit 1; }
for file in .whl/peers-*/*.whl; do cp "$file" "$DEST/"; done
for wheel in $(ls .whl/peers-*/*.part-* 2>/dev/null | sed 's/\.part-[0-9]*$//' | xargs -rn1 basename | sort -u); do
  parts=$(ls .whl/peers-*/"$wheel".part-* | awk -F'.part-' '{print $NF" "$0}' | sort -n | cut -d' ' -f2)
  cat $parts > "$DEST/$wheel"
done
sums=$(ls .whl/peers-*/SHA256SUMS | head -1)
(cd "$DEST" && sha256sum --quiet -c "$OLDPWD/$sums" 2>&1) | sed 's/^/join: /'
status=${PIPESTATUS[0]}
(( status == 0 )) && echo "join: $(ls "$DEST"/*.whl | wc -l) wheels in $DEST, checksums ok"
exit $status
