#!/usr/bin/env bash
# On the GPU machine (no index): joins the carried bundles .whl/peers-*/
# (join_wheels.sh) and installs the wheels into /tmp/site without
# dependencies, then writes /tmp/site/peers.env, which puts /tmp/site and
# the CUTLASS DSL's packages on PYTHONPATH (`--target` installs skip the
# nvidia_cutlass_dsl .pth file that would add dsl_packages to sys.path).
#   bash tools/gpu/install_peer_wheels.sh && source /tmp/site/peers.env
#   python -m jax_fastattn.bench --backend cuda ...   # tokamax, fa4 now found
set -uo pipefail
cd "$(git rev-parse --show-toplevel 2>/dev/null || pwd)"
SITE=${SITE:-/tmp/site}
bash "$(dirname "$0")/join_wheels.sh" /tmp/peer_wheels || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" /tmp/peer_wheels/*.whl \
  || exit 1
cat > "$SITE/peers.env" <<ENV
export PYTHONPATH=$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages:\${PYTHONPATH:-}
ENV
source "$SITE/peers.env"
python3 - <<'PY'
for module in ("tokamax", "flash_attn.cute"):
    try:
        __import__(module)
        print(f"install: import {module} ok")
    except Exception as error:
        print(f"install: import {module} failed: {type(error).__name__}: {error}")
PY
