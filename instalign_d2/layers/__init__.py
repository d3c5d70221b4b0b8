"""Layers shared by the model: multi-scale deformable attention and its compiled kernels."""

# The package exports what the module does, under the module's own list of public names.
from .ms_deform_attn import (  # noqa: F401
    LevelLayout,
    MSDeformAttn,
    __all__,
    level_layout,
    ms_deform_attn,
    ms_deform_attn_pytorch,
    msda_extension_info,
)
