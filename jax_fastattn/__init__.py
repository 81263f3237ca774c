"""jax_fastattn: fused, memory-efficient attention for JAX."""
from . import masks
from .attention import flash_attention, flash_attention_backward
from .decode import decode_attention
from .merge import merge_partials

__all__ = ["flash_attention", "flash_attention_backward", "decode_attention", "merge_partials", "masks"]
__version__ = "0.1.0"
