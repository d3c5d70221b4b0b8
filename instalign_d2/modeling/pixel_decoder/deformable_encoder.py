"""Deformable DETR's transformer encoder (Zhu et al. 2021, §4.1), the heart of the pixel decoder.

Every token of every level attends, through multi-scale deformable attention, to a few sampled
points around its own position on all levels; then an FFN. Post-norm residual blocks, as in
Deformable DETR and Mask2Former.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from instalign_d2.layers.ms_deform_attn import LevelLayout, LevelShapes, MSDeformAttn, level_layout

__all__ = ["DeformableEncoderLayer", "DeformableEncoder", "token_reference_points"]


def token_reference_points(
    spatial_shapes: Sequence[Tuple[int, int]], batch: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Where each token sits: the normalised (x, y) centre of its pixel, ``(B, S, levels, 2)``.

    A normalised position means the same place on every level, so a token's reference point is
    repeated across levels. (Deformable DETR scales it by each level's share of unpadded pixels;
    our batches hold same-size images without padding, where that ratio is 1.)
    """
    centres: List[torch.Tensor] = []
    for height, width in spatial_shapes:
        y = (torch.arange(height, device=device, dtype=dtype) + 0.5) / height
        x = (torch.arange(width, device=device, dtype=dtype) + 0.5) / width
        grid_y, grid_x = torch.meshgrid(y, x, indexing="ij")
        centres.append(torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), dim=-1))
    points = torch.cat(centres, dim=0)  # (S, 2)
    return points[None, :, None, :].expand(batch, -1, len(spatial_shapes), -1)


class DeformableEncoderLayer(nn.Module):
    """Deformable self-attention over all levels' tokens, then an FFN; residual + LayerNorm after each."""

    def __init__(
        self,
        d_model: int = 256,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        n_levels: int = 3,
        n_heads: int = 8,
        n_points: int = 4,
        msda_impl: str = "auto",
    ):
        super().__init__()
        self.self_attn = MSDeformAttn(
            d_model=d_model, n_levels=n_levels, n_heads=n_heads, n_points=n_points, impl=msda_impl
        )
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, dim_feedforward),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(dim_feedforward, d_model),
        )
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        for layer in self.ffn:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(
        self,
        tokens: torch.Tensor,
        pos: torch.Tensor,
        reference_points: torch.Tensor,
        layout: LevelLayout,
        padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        # Positions steer where to sample (the query), not what is read (the values).
        attended = self.self_attn(
            tokens + pos, reference_points, tokens, layout, None, padding_mask
        )
        tokens = self.norm1(tokens + self.dropout1(attended))
        return self.norm2(tokens + self.dropout2(self.ffn(tokens)))


class DeformableEncoder(nn.Module):
    """A stack of ``num_layers`` :class:`DeformableEncoderLayer` over flattened multi-level tokens."""

    def __init__(self, num_layers: int = 6, **layer_kwargs):
        super().__init__()
        if num_layers < 1:
            raise ValueError(
                f"DeformableEncoder: needs at least one layer (MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS), got {num_layers}"
            )
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(**layer_kwargs) for _ in range(num_layers)
        )

    def forward(
        self,
        tokens: torch.Tensor,
        pos: torch.Tensor,
        spatial_shapes: LevelShapes,
        level_start_index=None,
        padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``tokens``, ``pos`` (B, S, C): the levels' flattened maps and their positions;
        ``spatial_shapes``: the levels' (H, W) as python pairs (what the pixel decoder passes:
        nothing to read back from the GPU), an int64 (levels, 2) tensor or a LevelLayout;
        ``level_start_index``: None or the matching starts. -> (B, S, C).
        """
        # Checked once per distinct layout; every layer then gets the same checked layout.
        layout = level_layout(spatial_shapes, level_start_index, device=tokens.device)
        reference_points = token_reference_points(
            layout.shapes, tokens.shape[0], tokens.device, tokens.dtype
        )
        for layer in self.layers:
            tokens = layer(tokens, pos, reference_points, layout, padding_mask)
        return tokens
