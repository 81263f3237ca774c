"""jax_fastattn: fused, memory-efficient attention for JAX."""
from . import masks
from .attention import flash_attention
from .decode import decode_attention
from .merge import merge_partials

__all__ = ["flash_attention", "decode_attention", "merge_partials", "masks"]
__version__ = "0.1.0"
