"""LlamaConfig: the shape of a Llama-family decoder, with Hugging Face field names."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional, Tuple, Union

# Llama-3.1's RoPE scaling (Hugging Face meta-llama/Llama-3.1-8B config.json).
LLAMA31_ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Fields and defaults as Hugging Face `LlamaConfig` (config.json)."""
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = 1
    eos_token_id: Union[int, Tuple[int, ...], None] = 2
    pad_token_id: Optional[int] = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")

    def __hash__(self):  # rope_scaling is a dict: hash its items
        items = tuple(sorted((self.rope_scaling or {}).items()))
        return hash((dataclasses.replace(self, rope_scaling=None).__repr__(), items))

    @property
    def stop_tokens(self) -> Tuple[int, ...]:
        eos = self.eos_token_id
        return () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)

    @classmethod
    def preset(cls, name: str) -> "LlamaConfig":
        """"tiny" (tests, CPU), "llama2-7b", "llama3-8b" (Llama-3.1-8B: the
        Llama-3-8B shapes with Llama-3 RoPE scaling and 128K positions)."""
        if name not in PRESETS:
            raise ValueError(f"config name must be one of {sorted(PRESETS)}, got {name!r}")
        return PRESETS[name]

    @classmethod
    def from_json(cls, path: str) -> "LlamaConfig":
        """A Hugging Face config.json (a file, or a directory holding one)."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            raw = json.load(f)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    def num_params(self) -> int:
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = d * self.head_dim * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        layer = attn + 3 * d * f + 2 * d
        return v * d * (1 if self.tie_word_embeddings else 2) + self.num_hidden_layers * layer + d


PRESETS = {
    # Small enough for CPU tests; 16 query / 8 key-value heads so that both
    # split over a model axis of 8 (1x8 mesh), Llama-3 RoPE scaling exercised.
    "tiny": LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=16, num_key_value_heads=8, head_dim=8, max_position_embeddings=2048,
                        rms_norm_eps=1e-5, rope_theta=10000.0,
                        rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
                        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    # meta-llama/Llama-2-7b-hf config.json
    "llama2-7b": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                             rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2),
    # meta-llama/Llama-3.1-8B config.json
    "llama3-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                             rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=LLAMA31_ROPE_SCALING,
                             bos_token_id=128000, eos_token_id=128001),
}
