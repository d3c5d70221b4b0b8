"""Layers shared by the model: multi-scale deformable attention and its compiled kernels."""

from .ms_deform_attn import (
    LevelLayout,
    MSDeformAttn,
    level_layout,
    ms_deform_attn,
    ms_deform_attn_pytorch,
    msda_extension_info,
)

__all__ = [
    "LevelLayout",
    "MSDeformAttn",
    "level_layout",
    "ms_deform_attn",
    "ms_deform_attn_pytorch",
    "msda_extension_info",
]
