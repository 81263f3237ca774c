"""TRT-ViT (arXiv 2205.09579) in Flax NNX: blocks, the A-D family, baselines,
guideline experiments, latency harness (`python -m models.trt_vit.bench`),
training (`python -m models.trt_vit.train`) and ONNX export. See docs/TRT_VIT.md."""
from .backbone import VARIANTS, Backbone, BackboneConfig, StageSpec, tiny_config, trt_vit
from .baselines import PVT_SMALL, RESNETS, ViT, vit_small
from .blocks import BottleNeck, MixedBlock, TransformerBlock, attention_reference, set_attention_backend

__all__ = ["VARIANTS", "Backbone", "BackboneConfig", "StageSpec", "tiny_config", "trt_vit", "PVT_SMALL", "RESNETS",
           "ViT", "vit_small", "BottleNeck", "MixedBlock", "TransformerBlock", "attention_reference",
           "set_attention_backend"]
