"""Kernels in XLA's compiled GPU program of TRT-ViT models, compiled for an
H100 described but not attached (deviceless AOT), so it runs on a CPU host
with the jax CUDA plugin installed:

    JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 python tools/gpu/trt_vit_kernels.py \\
        --models TRT-ViT-A ResNet-50 PVT-style-S block-mixed

Counts the entry computation's fusions by kind and its custom calls by
target (cuDNN convolutions, ...), bf16, batch 8, 224x224. Attention is
compiled as XLA einsums (`--attention-backend xla`): our CUDA custom call
needs the extension built with CUDA.
"""
import argparse
import collections
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from models.trt_vit.backbone import VARIANTS, Backbone  # noqa: E402
from models.trt_vit.baselines import PVT_SMALL, RESNETS  # noqa: E402
from models.trt_vit.experiments import guideline_experiments  # noqa: E402
from models.trt_vit.measure import _abstract, _forward, cast_state  # noqa: E402
from tools.gpu.tp_schedule import deviceless_devices  # noqa: E402


def configs():
    found = {cfg.name: cfg for cfg in list(VARIANTS.values()) + list(RESNETS.values()) + [PVT_SMALL]}
    for experiment in guideline_experiments().values():
        found.update({cfg.name: cfg for cfg in experiment.members})
    return found


def kernel_counts(hlo_text: str) -> collections.Counter:
    """Fusions by kind and custom calls by target in the ENTRY computation."""
    counts = collections.Counter()
    for line in hlo_text[hlo_text.index("ENTRY"):].splitlines():
        if " fusion(" in line:
            kind = re.search(r"kind=(\w+)", line)
            counts["fusion " + (kind.group(1) if kind else "?")] += 1
        elif "custom-call(" in line:
            target = re.search(r'custom_call_target="([^"]+)"', line)
            counts[target.group(1) if target else "custom-call"] += 1
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["TRT-ViT-A", "ResNet-50", "PVT-style-S"])
    parser.add_argument("--attention-backend", default="xla")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    known = configs()
    unknown = [name for name in args.models if name not in known]
    if unknown:
        parser.error(f"--models: unknown {unknown}; known: {sorted(known)}")
    device = deviceless_devices(1)[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    for name in args.models:
        model = Backbone(known[name].replace(attention_backend=args.attention_backend), rngs=nnx.Rngs(0))
        model.eval()
        graphdef, state = cast_state(model, jnp.bfloat16)
        image = jax.ShapeDtypeStruct((args.batch, 224, 224, 3), jnp.bfloat16, sharding=sharding)
        compiled = jax.jit(_forward(graphdef)).lower(_abstract(state, sharding), image).compile()
        counts = kernel_counts(compiled.as_text())
        print(f"{name}: {sum(counts.values())} kernels: {dict(counts.most_common())}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
