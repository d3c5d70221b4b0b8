"""Visual backbones. Importing this registers ``TimmBackbone`` in Detectron2's BACKBONE_REGISTRY."""

from .timm_backbone import FEATURE_STRIDES, TimmBackbone

__all__ = ["FEATURE_STRIDES", "TimmBackbone"]
