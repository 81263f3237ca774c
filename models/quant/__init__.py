"""CSMPQ (arXiv 2212.10220): class-separability mixed-precision quantization.

separability.py scores each layer's features with TF-IDF; allocation.py turns
the scores into bit-widths under a size budget by integer linear programming.
"""
from .allocation import Allocation, allocate_bits, allocate_bits_relaxed, bops, model_size_mb
from .separability import layer_score, model_scores, pooled_features

__all__ = ["Allocation", "allocate_bits", "allocate_bits_relaxed", "bops", "model_size_mb", "layer_score",
           "model_scores", "pooled_features"]
