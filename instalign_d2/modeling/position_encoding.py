"""Fixed 2-D sine/cosine positional encoding of a feature map (DETR, Carion et al. 2020, §A.4).

Each pixel gets ``num_pos_feats`` channels encoding its row and as many encoding its column:
for a coordinate ``p`` (the running count of valid pixels along that axis, optionally
normalised to ``(0, scale]``) and channel ``i``,

    enc[2k]   = sin(p / temperature ** (2k / num_pos_feats))
    enc[2k+1] = cos(p / temperature ** (2k / num_pos_feats))

The row channels come first, then the column channels. Both the pixel decoder and the POT
decoder use it for their visual tokens.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

__all__ = ["PositionEmbeddingSine", "sine_encoding"]


def sine_encoding(values: torch.Tensor, num_feats: int, temperature: float = 10000) -> torch.Tensor:
    """``(...)`` coordinates -> ``(..., num_feats)``: channel 2k is ``sin(p / t ** (2k / n))``,
    channel 2k+1 the cosine of the same frequency."""
    pair_index = torch.arange(num_feats, dtype=torch.float32, device=values.device) // 2
    wavelengths = temperature ** (2 * pair_index / num_feats)
    scaled = values.float()[..., None] / wavelengths
    return torch.stack((scaled[..., 0::2].sin(), scaled[..., 1::2].cos()), dim=-1).flatten(-2)


class PositionEmbeddingSine(nn.Module):
    """Sine positional encoding, ``(B, C, H, W) -> (B, 2 * num_pos_feats, H, W)``.

    Args:
        num_pos_feats: channels per axis (half of the output channels).
        temperature: base of the geometric progression of wavelengths.
        normalize: divide each coordinate by its axis' number of valid pixels, so positions
            span ``(0, scale]`` whatever the map size -- what lets one model run at several
            input sizes.
        scale: the span of normalised positions; default ``2 * pi``. Only with ``normalize``.
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: float = 10000,
        normalize: bool = True,
        scale: Optional[float] = None,
    ):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError(
                "PositionEmbeddingSine: scale only applies with normalize=True; pass normalize=True or drop scale."
            )
        if num_pos_feats <= 0 or num_pos_feats % 2:
            raise ValueError(
                f"PositionEmbeddingSine: num_pos_feats must be a positive even number (sin/cos pairs), got {num_pos_feats}"
            )
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x`` (B, C, H, W) gives the size, device and dtype; ``mask`` (B, H, W) bool marks
        padding (True) and is all False when None. Returns (B, 2 * num_pos_feats, H, W)."""
        if x.dim() != 4:
            raise ValueError(
                f"PositionEmbeddingSine: x must be (B, C, H, W), got shape {tuple(x.shape)}"
            )
        batch, _, height, width = x.shape
        if mask is None:
            mask = torch.zeros((batch, height, width), dtype=torch.bool, device=x.device)
        elif tuple(mask.shape) != (batch, height, width):
            raise ValueError(
                f"PositionEmbeddingSine: mask must be (B, H, W) = {(batch, height, width)}, got {tuple(mask.shape)}"
            )
        valid = (~mask).to(torch.float32)
        # Coordinates count valid pixels, so padding on the right/bottom does not shift them.
        row = valid.cumsum(1)
        col = valid.cumsum(2)
        if self.normalize:
            eps = 1e-6  # an all-padding row/column would otherwise divide by zero
            row = row / (row[:, -1:, :] + eps) * self.scale
            col = col / (col[:, :, -1:] + eps) * self.scale

        row = sine_encoding(row, self.num_pos_feats, self.temperature)  # (B, H, W, num_pos_feats)
        col = sine_encoding(col, self.num_pos_feats, self.temperature)
        return torch.cat((row, col), dim=3).permute(0, 3, 1, 2).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, "
            f"normalize={self.normalize}, scale={self.scale:.4f}"
        )
