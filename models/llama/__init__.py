"""Llama-family decoder on jax_fastattn: model, safetensors loader, generate()."""
from .checkpoint import load_safetensors
from .config import LlamaConfig
from .generation import generate
from .model import Llama, with_layer_storage

__all__ = ["LlamaConfig", "Llama", "generate", "load_safetensors", "with_layer_storage"]
