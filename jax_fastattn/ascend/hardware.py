"""Ascend NPU descriptions as data: core counts, buffer sizes, peak rates.

Figures marked "public" come from vendor material and the FastAttention
paper (Lin et al., "FastAttention: Extend FlashAttention2 to NPUs and
Low-resource GPUs", arXiv 2410.16663, sec. 3 and tab. 1); those marked
"estimate" are not published and are assumptions of the cost model
(`cost.py`), shown as such wherever they are used.
"""
from __future__ import annotations

import dataclasses

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB


@dataclasses.dataclass(frozen=True)
class AscendHardware:
    """One Ascend chip, as the tiling plan and the cost model see it."""

    name: str
    cube_cores: int            # AI Cube (matrix) cores
    vector_cores: int          # AI Vector cores
    clock_ghz: float
    l1_bytes: int              # per Cube core: staging buffer between GM and L0
    l0a_bytes: int             # per Cube core: left matmul operand
    l0b_bytes: int             # per Cube core: right matmul operand
    l0c_bytes: int             # per Cube core: fp32 accumulator
    ub_bytes: int              # per Vector core: Unified Buffer
    l2_bytes: int              # shared by all cores
    cube_tflops: float         # fp16/bf16 dense matmul peak, whole chip
    vector_tflops: float       # fp16 vector peak, whole chip
    hbm_bytes: int
    hbm_tbs: float             # HBM bandwidth, TB/s (1e12 B/s)
    l2_tbs: float              # L2 bandwidth, TB/s (estimate: not published)
    cube_vector_via_l2: bool   # True: Cube and Vector exchange data only through L2/GM
    sync_us: float             # one Cube<->Vector handoff (flag set, wait, visibility); estimate
    fractal: int = 16          # Cube operands are 16x16 fractals (16x16x16 MAC per cycle)

    @property
    def vector_per_cube(self) -> int:
        """Vector cores that work for one Cube core (they split its rows)."""
        return max(1, self.vector_cores // self.cube_cores)


# Ascend 910B (public): 24 Cube + 48 Vector cores at 1.8 GHz; per Cube core
# L1 512 KiB, L0A/L0B 64 KiB, L0C 128 KiB; per Vector core UB 192 KiB; L2
# 192 MiB; Cube ~353-376 TFLOP/s fp16 (24 cores x 16^3 MAC x 2 x 1.8 GHz =
# 354), Vector ~22-23.5 TFLOP/s; 64 GB HBM at 1.6 TB/s. Cube and Vector are
# separate cores that exchange data only through L2/global memory, which is
# why every handoff is a synchronisation through memory.
ASCEND_910B = AscendHardware(
    name="Ascend 910B", cube_cores=24, vector_cores=48, clock_ghz=1.8,
    l1_bytes=512 * KIB, l0a_bytes=64 * KIB, l0b_bytes=64 * KIB, l0c_bytes=128 * KIB,
    ub_bytes=192 * KIB, l2_bytes=192 * MIB,
    cube_tflops=354.0, vector_tflops=22.0, hbm_bytes=64 * 10**9, hbm_tbs=1.6,
    l2_tbs=7.0,            # estimate
    cube_vector_via_l2=True,
    sync_us=1.0,           # estimate: a flag write + poll through GM and the cache maintenance around it
)

# Ascend 910 (first generation, "910A"; public: Liao et al., "Ascend: a
# Scalable and Unified Architecture for Ubiquitous Deep Neural Network
# Computing", HPCA 2021, and Hot Chips 31): 32 DaVinci cores at ~1 GHz, each
# with its own Cube and Vector unit (Cube output L0C -> UB inside the core, no
# trip through L2); L1 1 MiB, L0A/L0B 64 KiB, L0C 256 KiB, UB 256 KiB; L2
# 32 MiB; 256 TFLOP/s fp16; 32 GB HBM at 1.2 TB/s. Vector peak is an estimate
# (2048-bit vector unit per core).
ASCEND_910A = AscendHardware(
    name="Ascend 910A", cube_cores=32, vector_cores=32, clock_ghz=1.0,
    l1_bytes=1 * MIB, l0a_bytes=64 * KIB, l0b_bytes=64 * KIB, l0c_bytes=256 * KIB,
    ub_bytes=256 * KIB, l2_bytes=32 * MIB,
    cube_tflops=256.0, vector_tflops=8.0, hbm_bytes=32 * 10**9, hbm_tbs=1.2,
    l2_tbs=4.0,            # estimate
    cube_vector_via_l2=False,
    sync_us=0.1,           # estimate: in-core pipe flags (set_flag / wait_flag)
)

HARDWARE = {"910B": ASCEND_910B, "910A": ASCEND_910A}


def get_hardware(name_or_hw) -> AscendHardware:
    """`AscendHardware` from itself or from a name in `HARDWARE`."""
    if isinstance(name_or_hw, AscendHardware):
        return name_or_hw
    if name_or_hw in HARDWARE:
        return HARDWARE[name_or_hw]
    raise ValueError(f"hw must be an AscendHardware or one of {sorted(HARDWARE)}, got {name_or_hw!r}")
