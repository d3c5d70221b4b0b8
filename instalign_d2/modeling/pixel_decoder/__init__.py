"""Pixel decoders behind ``PIXEL_DECODER_REGISTRY`` (importing this registers them)."""

from .build import PIXEL_DECODER_REGISTRY, build_pixel_decoder
from .deformable_encoder import DeformableEncoder, DeformableEncoderLayer, token_reference_points
from .msdeformattn import MSDeformAttnPixelDecoder

__all__ = [
    "PIXEL_DECODER_REGISTRY",
    "DeformableEncoder",
    "DeformableEncoderLayer",
    "MSDeformAttnPixelDecoder",
    "build_pixel_decoder",
    "token_reference_points",
]
