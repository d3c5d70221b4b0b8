"""Mask2Former's multi-scale deformable-attention pixel decoder (Cheng et al. 2022, §3.1, §4).

Backbone maps at strides 8/16/32 are projected to ``conv_dim`` (1x1 conv + GroupNorm), given sine
positions plus a learned per-level embedding, and refined jointly by a Deformable DETR encoder.
The stride-4 map joins FPN-style: a lateral 1x1 conv plus the upsampled stride-8 output, then a
3x3 conv. A 1x1 conv on that stride-4 map gives the mask features.

In the paper's notation (Fig. 2): the encoder outputs at strides 32, 16, 8 are
``V1, V2, V3`` -- the maps the POT blocks attend to in turn -- and the mask features are ``V4``.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from fvcore.nn import weight_init
from torch import nn

from ..position_encoding import PositionEmbeddingSine
from .build import PIXEL_DECODER_REGISTRY
from .deformable_encoder import DeformableEncoder

__all__ = ["MSDeformAttnPixelDecoder"]

# The decoder attends to this many scales in turn (Mask2Former's 3; the paper's V1..V3).
NUM_DECODER_LEVELS = 3
# GroupNorm of the input projections, as Mask2Former's.
INPUT_PROJ_GROUPS = 32


@PIXEL_DECODER_REGISTRY.register()
class MSDeformAttnPixelDecoder(nn.Module):
    """Backbone features -> ``(mask_features, multi_scale_features)``.

    Args:
        input_shape: backbone feature name -> ShapeSpec (channels, stride), e.g. res2..res5.
        transformer_in_features: the maps the deformable encoder refines (res3..res5).
        conv_dim: width of the encoder and of the multi-scale outputs (C of V1..V3).
        mask_dim: width of the mask features (C of V4).
        norm: norm of the FPN convs ("GN", "", ... as Detectron2's ``get_norm``).
        common_stride: stride of the mask features (4).
        transformer_enc_layers, transformer_nheads, transformer_dim_feedforward,
        transformer_dropout, transformer_npoints: the deformable encoder.
        msda_impl: which multi-scale deformable attention kernel runs ("auto", "cuda", "cpu",
            "pytorch"; see ``instalign_d2.layers.ms_deform_attn``).
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        transformer_in_features: Sequence[str] = ("res3", "res4", "res5"),
        conv_dim: int = 256,
        mask_dim: int = 256,
        norm: str = "GN",
        common_stride: int = 4,
        transformer_enc_layers: int = 6,
        transformer_nheads: int = 8,
        transformer_dim_feedforward: int = 1024,
        transformer_dropout: float = 0.0,
        transformer_npoints: int = 4,
        msda_impl: str = "auto",
    ):
        super().__init__()
        missing = [name for name in transformer_in_features if name not in input_shape]
        if not transformer_in_features or missing:
            raise ValueError(
                f"MSDeformAttnPixelDecoder: the encoder's inputs {list(transformer_in_features)} "
                f"(MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES) must be among the backbone "
                f"features {sorted(input_shape)} (MODEL.SEM_SEG_HEAD.IN_FEATURES and the backbone's OUT_FEATURES)"
            )
        if conv_dim % INPUT_PROJ_GROUPS:
            raise ValueError(
                f"MSDeformAttnPixelDecoder: MODEL.SEM_SEG_HEAD.CONVS_DIM={conv_dim} must be a multiple of "
                f"{INPUT_PROJ_GROUPS} (GroupNorm groups of the input projections)"
            )
        by_stride = sorted(input_shape.items(), key=lambda item: item[1].stride)
        self.in_features = [name for name, _ in by_stride]
        # The encoder's levels run from coarse to fine (res5, res4, res3): the order of V1..V3.
        self.transformer_in_features = sorted(
            transformer_in_features, key=lambda name: -input_shape[name].stride
        )
        self.common_stride = common_stride
        self.conv_dim = conv_dim
        self.mask_dim = mask_dim

        self.input_proj = nn.ModuleList()
        for name in self.transformer_in_features:
            projection = nn.Sequential(
                nn.Conv2d(input_shape[name].channels, conv_dim, kernel_size=1),
                nn.GroupNorm(INPUT_PROJ_GROUPS, conv_dim),
            )
            nn.init.xavier_uniform_(projection[0].weight, gain=1)
            nn.init.zeros_(projection[0].bias)
            self.input_proj.append(projection)

        num_levels = len(self.transformer_in_features)
        self.position_embedding = PositionEmbeddingSine(conv_dim // 2, normalize=True)
        # Sine positions repeat on every level; this tells the levels apart.
        self.level_embed = nn.Parameter(torch.empty(num_levels, conv_dim))
        nn.init.normal_(self.level_embed)
        self.encoder = DeformableEncoder(
            num_layers=transformer_enc_layers,
            d_model=conv_dim,
            dim_feedforward=transformer_dim_feedforward,
            dropout=transformer_dropout,
            n_levels=num_levels,
            n_heads=transformer_nheads,
            n_points=transformer_npoints,
            msda_impl=msda_impl,
        )

        # FPN levels: the backbone maps finer than the encoder's finest, down to common_stride.
        finest_encoder_stride = min(
            input_shape[name].stride for name in self.transformer_in_features
        )
        num_fpn_levels = max(
            0, int(round(math.log2(finest_encoder_stride) - math.log2(common_stride)))
        )
        fpn_candidates = [
            name for name in self.in_features if input_shape[name].stride < finest_encoder_stride
        ]
        if len(fpn_candidates) < num_fpn_levels:
            raise ValueError(
                f"MSDeformAttnPixelDecoder: mask features at stride {common_stride} (MODEL.SEM_SEG_HEAD.COMMON_STRIDE) "
                f"need backbone maps below stride {finest_encoder_stride}; got {fpn_candidates}. Add res2 to "
                "MODEL.SEM_SEG_HEAD.IN_FEATURES (and the backbone's outputs)"
            )
        # Coarse to fine, each upsampled onto the next.
        self.fpn_features = fpn_candidates[:num_fpn_levels][::-1]
        use_bias = norm == ""
        self.lateral_convs = nn.ModuleList()
        self.output_convs = nn.ModuleList()
        for name in self.fpn_features:
            lateral = Conv2d(
                input_shape[name].channels,
                conv_dim,
                kernel_size=1,
                bias=use_bias,
                norm=get_norm(norm, conv_dim),
            )
            output = Conv2d(
                conv_dim,
                conv_dim,
                kernel_size=3,
                padding=1,
                bias=use_bias,
                norm=get_norm(norm, conv_dim),
                activation=F.relu,
            )
            weight_init.c2_xavier_fill(lateral)
            weight_init.c2_xavier_fill(output)
            self.lateral_convs.append(lateral)
            self.output_convs.append(output)

        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=1)
        weight_init.c2_xavier_fill(self.mask_features)
        self.num_decoder_levels = min(NUM_DECODER_LEVELS, num_levels + len(self.fpn_features))

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        head = cfg.MODEL.SEM_SEG_HEAD
        missing = [name for name in head.IN_FEATURES if name not in input_shape]
        if missing:
            raise ValueError(
                f"MSDeformAttnPixelDecoder: MODEL.SEM_SEG_HEAD.IN_FEATURES {list(head.IN_FEATURES)} asks for {missing}, "
                f"which the backbone does not return (it gives {sorted(input_shape)})"
            )
        return {
            "input_shape": {name: input_shape[name] for name in head.IN_FEATURES},
            "transformer_in_features": list(head.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES),
            "conv_dim": head.CONVS_DIM,
            "mask_dim": head.MASK_DIM,
            "norm": head.NORM,
            "common_stride": head.COMMON_STRIDE,
            "transformer_enc_layers": head.TRANSFORMER_ENC_LAYERS,
            "transformer_nheads": head.NHEADS,
            "transformer_dim_feedforward": head.DIM_FEEDFORWARD,
            "transformer_dropout": head.DROPOUT,
            "transformer_npoints": head.NPOINTS,
            "msda_impl": head.MSDA_IMPL,
        }

    def _encode(self, features: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        """The deformable encoder over the projected levels; one (B, conv_dim, h, w) map per level, coarse first."""
        tokens, positions, shapes = [], [], []
        for level, name in enumerate(self.transformer_in_features):
            projected = self.input_proj[level](features[name])
            position = self.position_embedding(projected) + self.level_embed[level].view(
                1, -1, 1, 1
            )
            shapes.append((int(projected.shape[-2]), int(projected.shape[-1])))
            tokens.append(projected.flatten(2).transpose(1, 2))  # (B, h*w, C)
            positions.append(position.flatten(2).transpose(1, 2))
        # The levels go down as python ints, not as tensors: the attention validates them once
        # per distinct image size and nothing is copied to or read back from the GPU per step.
        memory = self.encoder(torch.cat(tokens, 1), torch.cat(positions, 1), tuple(shapes))
        batch = memory.shape[0]
        sizes = [h * w for h, w in shapes]
        return [
            level_tokens.transpose(1, 2).reshape(batch, self.conv_dim, h, w)
            for level_tokens, (h, w) in zip(memory.split(sizes, dim=1), shapes)
        ]

    def forward_features(
        self, features: Dict[str, torch.Tensor]
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """``features``: backbone maps by name (NCHW). Returns ``mask_features``
        (B, mask_dim, H/common_stride, W/common_stride) and ``multi_scale_features``, the
        ``num_decoder_levels`` (3) maps (B, conv_dim, h, w) at strides 32, 16, 8 in that order."""
        needed = self.transformer_in_features + self.fpn_features
        absent = [name for name in needed if name not in features]
        if absent:
            raise KeyError(
                f"MSDeformAttnPixelDecoder: backbone features {absent} missing; got {sorted(features)}"
            )

        outputs = self._encode(features)
        for name, lateral_conv, output_conv in zip(
            self.fpn_features, self.lateral_convs, self.output_convs
        ):
            lateral = lateral_conv(features[name])
            # Interpolate to the exact size: odd map sizes do not halve evenly.
            upsampled = F.interpolate(
                outputs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False
            )
            outputs.append(output_conv(lateral + upsampled))
        return self.mask_features(outputs[-1]), outputs[: self.num_decoder_levels]

    def forward(self, features: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        return self.forward_features(features)
