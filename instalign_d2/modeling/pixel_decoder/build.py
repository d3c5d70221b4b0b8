"""Registry of pixel decoders, chosen by ``MODEL.SEM_SEG_HEAD.NAME`` (Mask2Former's key)."""

from __future__ import annotations

from typing import Dict

from detectron2.layers import ShapeSpec
from detectron2.utils.registry import Registry

__all__ = ["PIXEL_DECODER_REGISTRY", "build_pixel_decoder"]

PIXEL_DECODER_REGISTRY = Registry("PIXEL_DECODER")
PIXEL_DECODER_REGISTRY.__doc__ = """
Pixel decoders: called as ``obj(cfg, input_shape)`` with the backbone's ``output_shape()``;
they provide ``forward_features(features) -> (mask_features, multi_scale_features)``.
"""


def build_pixel_decoder(cfg, input_shape: Dict[str, ShapeSpec]):
    """The pixel decoder named by ``cfg.MODEL.SEM_SEG_HEAD.NAME`` over the backbone features
    ``input_shape`` (name -> ShapeSpec, e.g. ``backbone.output_shape()``)."""
    name = cfg.MODEL.SEM_SEG_HEAD.NAME
    if name not in PIXEL_DECODER_REGISTRY:
        known = sorted(entry for entry, _ in PIXEL_DECODER_REGISTRY)
        raise KeyError(
            f"MODEL.SEM_SEG_HEAD.NAME={name!r} is not a registered pixel decoder; choose one of {known}"
        )
    decoder = PIXEL_DECODER_REGISTRY.get(name)(cfg, input_shape)
    if not callable(getattr(decoder, "forward_features", None)):
        raise TypeError(f"pixel decoder {name!r} has no forward_features(features) method")
    return decoder
