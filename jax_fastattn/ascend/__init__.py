"""FastAttention on Ascend 910 NPUs, in simulation: two-level tiling plans,
the compressed tiling-mask, a tile-level simulator of the Cube/Vector
pipeline and a roofline-style time model (see docs/ASCEND.md).

    from jax_fastattn.ascend import plan, simulate, fused_time
    tp = plan((1, 8192, 32, 128), "float16", causal=True)
    print(tp.describe(), fused_time(tp).seconds)
"""
from .cost import fused_time, standard_time
from .hardware import ASCEND_910A, ASCEND_910B, HARDWARE, AscendHardware
from .tiling import AttentionShape, TilingPlan, plan
from .simulator import SimResult, simulate
from .tiling_mask import COMPRESSED_SIZE, CompressedMask, mask_memory

__all__ = [
    "ASCEND_910A", "ASCEND_910B", "HARDWARE", "AscendHardware", "AttentionShape", "TilingPlan", "plan",
    "SimResult", "simulate", "fused_time", "standard_time", "COMPRESSED_SIZE", "CompressedMask", "mask_memory",
]
