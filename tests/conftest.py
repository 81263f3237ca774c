import os

# Multi-device logic is tested on host devices; must be set before jax starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import dataclasses  # noqa: E402
from typing import Optional  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

from jax_fastattn import backends, ffi  # noqa: E402
from jax_fastattn.config import KernelConfig, TileConfig  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Case:
    """One backend configuration the shared suite runs: the backend name
    given to flash_attention, its KernelConfig, the dtype the suite's
    dtype-agnostic tests use, and whether it needs a GPU."""

    backend: str
    config: Optional[KernelConfig]
    dtype: object
    gpu: bool = False

    def supports(self, dtype, head_dim: int = 64) -> bool:
        """What the backend table says this backend takes ("auto" takes
        everything: what its kernel does not, runs on xla)."""
        if self.backend == "auto":
            return True
        return backends.BACKENDS[self.backend].supports(dtype, head_dim)

    def available(self) -> Optional[str]:
        """None if it can run here, else why not."""
        if not self.gpu:
            return None
        if not ffi.gpu_available():
            return "needs a CUDA GPU"
        target = {"cuda": "fastattn_forward_cuda", "volta": "fastattn_forward_volta"}.get(self.backend)
        if target is not None and target not in ffi.cuda_targets():
            return f"this build has no {target}"
        return None


SMALL_CPU_TILES = KernelConfig(tiles=TileConfig(tile_q=8, tile_kv=32))
SMALL_XLA_TILES = KernelConfig(tiles=TileConfig(tile_q=8, tile_kv=16))
MMA_SYNC = KernelConfig(cuda_forward="mma_sync", cuda_backward="mma_sync")

# Every kernel backend at its production tiles, and the cpu and xla ones also
# at small tiles, so that short test sequences still span many tiles (tails,
# diagonal tiles). The GPU cases run on the device machine (`pytest -m gpu`).
CASES = {
    "cpu": Case("cpu", None, jnp.float32),
    "cpu-small-tiles": Case("cpu", SMALL_CPU_TILES, jnp.float32),
    "xla": Case("xla", None, jnp.float32),
    "xla-small-tiles": Case("xla", SMALL_XLA_TILES, jnp.float32),
    "reference": Case("reference", None, jnp.float32),
    # On sm90: the wgmma kernels (D 64/128; mma.sync at other head dims).
    "cuda-bf16": Case("cuda", None, jnp.bfloat16, gpu=True),
    # The mma.sync kernels that sm80/sm89 GPUs run, in float16.
    "cuda-mma_sync-f16": Case("cuda", MMA_SYNC, jnp.float16, gpu=True),
    "volta-f16": Case("volta", None, jnp.float16, gpu=True),
    # float32 on a GPU: "auto" takes the pure-JAX backend (documented).
    "auto-f32": Case("auto", None, jnp.float32, gpu=True),
}


@pytest.fixture(params=[pytest.param(name, marks=pytest.mark.gpu) if case.gpu else name
                        for name, case in CASES.items()])
def case(request):
    """A backend configuration of the shared suite (tests/test_attention.py)."""
    chosen = CASES[request.param]
    why_not = chosen.available()
    if why_not:
        pytest.skip(why_not)
    return chosen


@pytest.fixture(params=["cpu", "xla", "reference"])
def backend(request):
    """Backend name for the decode tests that run on the CPU."""
    return request.param
