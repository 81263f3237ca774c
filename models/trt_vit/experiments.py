"""TRT-ViT's four guideline experiments as controlled comparisons at
matched FLOPs (arXiv 2205.09579, Sec. 3). Each experiment is a group of
`BackboneConfig`s; the first member is the one the guideline favours.

Matching. Stage kinds are the variable; everything else is held fixed
where it can be, and the remaining knob (depth of the deep stage) was
chosen so that the group's XLA cost-analysis FLOPs agree within
`FLOPS_TOLERANCE` (checked by tests/test_trt_vit.py; the bench reports the
exact ratios):

1. stage order (quad): CNN early / Transformer late vs the reverse vs pure
   CNN vs pure Transformer. A CNN stage is ResNet-50's (BottleNeck, output
   256/512/1024/2048 = inner width 64/128/256/512); a Transformer stage is
   PVT-Small's (64/128/320/512 wide, heads of 64, keys reduced 8/4/2/1, MLP
   8/8/4/4): the two families' stages cost about the same FLOPs at equal
   depth (3, 4, 6, 3), so depths stay equal; CCCC is ResNet-50, TTTT is
   the PVT-style baseline.
2. depth distribution (pair): TRT-ViT-A's kinds and widths (C C M M),
   shallow-early/deep-late (1, 2, 6, 2) vs deep-early/shallow-late.
3. block kind (triple): TRT-ViT-A with its mixed blocks vs pure
   Transformer blocks, (a) at the width of the mixed block's Transformer
   branch with more blocks, (b) at the full stage width with fewer.
4. order inside the mixed block (pair): Transformer then BottleNeck vs
   BottleNeck then Transformer; identical parameters and FLOPs by
   construction.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

from .backbone import VARIANTS, BackboneConfig, StageSpec
from .baselines import PVT_SMALL, RESNETS

FLOPS_TOLERANCE = 0.10  # |FLOPs / FLOPs of the group's first member - 1|


@dataclasses.dataclass(frozen=True)
class Experiment:
    guideline: str
    question: str
    members: Tuple[BackboneConfig, ...]  # members[0] follows the guideline


def _stage_order(kinds: str) -> BackboneConfig:
    resnet, pvt = RESNETS["resnet50"].stages, PVT_SMALL.stages
    stages = tuple(resnet[i] if kind == "C" else pvt[i] for i, kind in enumerate(kinds))
    stem = "resnet" if kinds[0] == "C" else "patch4"
    return BackboneConfig(f"order-{kinds}", stages, stem=stem, stem_channels=64)


def _with_stages(base: BackboneConfig, name: str, **per_stage) -> BackboneConfig:
    """`base` with stage fields replaced: per_stage maps a field to a
    4-tuple (None keeps the base value)."""
    stages = []
    for i, spec in enumerate(base.stages):
        changes = {field: values[i] for field, values in per_stage.items() if values[i] is not None}
        stages.append(dataclasses.replace(spec, **changes))
    return base.replace(name=name, stages=tuple(stages))


def guideline_experiments() -> Dict[str, Experiment]:
    a = VARIANTS["A"]
    return {
        "stage_order": Experiment(
            "1", "Which stages should be CNN and which Transformer?",
            tuple(_stage_order(k) for k in ("CCTT", "TTCC", "CCCC", "TTTT"))),
        "depth_distribution": Experiment(
            "2", "Shallow early and deep late, or the reverse?",
            (a.replace(name="depth-shallow-early (1,2,6,2)"),
             _with_stages(a, "depth-deep-early (4,6,2,1)", depth=(4, 6, 2, 1)))),
        "block_kind": Experiment(
            "3", "Mixed Transformer/BottleNeck block or pure Transformer block?",
            (a.replace(name="block-mixed"),
             _with_stages(a, "block-transformer-narrow (384/512 wide, 9+2)", kind=(None, None, "transformer",
                                                                               "transformer"),
                          channels=(None, None, 384, 512), depth=(None, None, 9, 2)),
             _with_stages(a, "block-transformer-wide (768/1024 wide, 2+1)", kind=(None, None, "transformer",
                                                                              "transformer"),
                          depth=(None, None, 2, 1)))),
        "mixed_order": Experiment(
            "4", "Inside the mixed block: Transformer first or BottleNeck first?",
            (a.replace(name="mixed-global-then-local"),
             _with_stages(a, "mixed-local-then-global", kind=(None, None, "mixed_local_first",
                                                              "mixed_local_first")))),
    }


def stage_table(cfg: BackboneConfig) -> str:
    """Markdown rows of a config's stages (for docs/TRT_VIT.md)."""
    rows = []
    for index, spec in enumerate(cfg.stages, 1):
        attention = spec.channels // 2 if spec.kind.startswith("mixed") else spec.channels
        heads = attention // cfg.head_dim if spec.kind != "bottleneck" else "-"
        sr = spec.sr_ratio if spec.kind != "bottleneck" else "-"
        mlp = spec.mlp_ratio if spec.kind != "bottleneck" else "-"
        rows.append(f"| {index} | {spec.kind} | {spec.depth} | {spec.channels} | {spec.stride} | {heads} | {sr} "
                    f"| {mlp} |")
    return "\n".join(rows)


__all__ = ["Experiment", "FLOPS_TOLERANCE", "guideline_experiments", "stage_table", "StageSpec"]
