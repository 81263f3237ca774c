import os

# Multi-device logic is tested on host devices; must be set before jax starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import pytest  # noqa: E402

from jax_fastattn import attention  # noqa: E402
from jax_fastattn.config import TileConfig  # noqa: E402

# Each kernel backend is tested at its production tiles and at small tiles,
# so that short test sequences still span many tiles (tails, diagonal tiles).
BACKEND_TILES = {
    "cpu": attention.CPU_TILES,
    "cpu-small-tiles": TileConfig(tile_q=8, tile_kv=32),
    "xla": attention.XLA_TILES,
    "xla-small-tiles": TileConfig(tile_q=8, tile_kv=16),
}


@pytest.fixture(params=list(BACKEND_TILES))
def backend(request, monkeypatch):
    """Backend name for flash_attention, with its tile sizes patched in."""
    name = request.param
    base = name.split("-")[0]
    monkeypatch.setattr(attention, "CPU_TILES" if base == "cpu" else "XLA_TILES", BACKEND_TILES[name])
    return base
