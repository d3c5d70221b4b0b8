"""Where the object queries' masks lie, as positions for the decoder's attentions.

The paper is silent on the queries' positions inside the POT blocks; Mask2Former gives each query
a learned positional embedding that is the same for every image. With
``MODEL.INSTALIGN.QUERY_POSITIONS_FROM_MASKS`` each block also adds to it an embedding of the
query's current mask — its centre and spread — so that the self-attention can compare queries by
where their objects lie ("the leftmost small shape" is the small shape no other small shape is
left of), in the spirit of the box queries of DAB-DETR. With
``MODEL.INSTALIGN.SELF_ATTENTION_GEOMETRY_BIAS`` the self-attention instead gets, for every pair
of queries, a learned bias per head from where one mask lies relative to the other (the geometric
weights of Relation Networks, Hu et al. 2018): a head can then read exactly the queries whose
objects lie to its left, and the query learn whether one of them is of its kind. With
``MODEL.INSTALIGN.SELF_ATTENTION_GEOMETRY_BIAS_READS_TEXT`` the bias also reads the expression (a
code of its mean word feature), so that "leftmost" itself can turn on the head that reads the
left side, instead of the block having to combine the word with a side afterwards.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..aggregation import sentence_feature
from ..position_encoding import sine_encoding
from .attention_layers import MLP


def mask_geometry(mask_logits: torch.Tensor) -> torch.Tensor:
    """``(B, N, H, W)`` mask logits -> ``(B, N, 4)``: the centre ``(x, y)`` and the standard
    deviations ``(sx, sy)`` of each mask's probability mass, in fractions of the map's side.

    Pixel centres lie at ``(i + 0.5) / W``. No gradient flows back into the masks: the geometry is
    read from a prediction, as the masked attention reads its attention mask.
    """
    probabilities = mask_logits.detach().float().sigmoid()
    height, width = probabilities.shape[-2:]
    device = probabilities.device
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    mass_x = probabilities.sum(-2)  # (B, N, W): the mass of each column
    mass_y = probabilities.sum(-1)  # (B, N, H)
    total = mass_x.sum(-1).clamp_min(1e-6)
    cx = (mass_x * xs).sum(-1) / total
    cy = (mass_y * ys).sum(-1) / total
    sx = ((mass_x * (xs - cx[..., None]) ** 2).sum(-1) / total).clamp_min(0).sqrt()
    sy = ((mass_y * (ys - cy[..., None]) ** 2).sum(-1) / total).clamp_min(0).sqrt()
    return torch.stack((cx, cy, sx, sy), dim=-1)


class MaskPositionEmbedding(nn.Module):
    """Mask geometry -> sine encoding of each of its 4 numbers -> 2-layer MLP -> ``(B, N, C)``."""

    def __init__(self, hidden_dim: int, temperature: float = 20.0):
        super().__init__()
        if hidden_dim % 8:
            raise ValueError(
                f"MaskPositionEmbedding: hidden_dim={hidden_dim} must be a multiple of 8 "
                "(a sin/cos pair per frequency for each of the 4 mask numbers)."
            )
        self.feats_per_number = hidden_dim // 4
        # A low temperature: the numbers lie in [0, 1], so the wavelengths must be short enough
        # to tell apart objects a few pixels apart (DAB-DETR uses 20 for its boxes).
        self.temperature = temperature
        self.mlp = MLP(hidden_dim, hidden_dim, hidden_dim, 2)

    def forward(self, mask_logits: torch.Tensor) -> torch.Tensor:
        geometry = mask_geometry(mask_logits) * 2 * torch.pi  # one period over the image
        encoded = sine_encoding(geometry, self.feats_per_number, self.temperature).flatten(-2)
        return self.mlp(encoded.to(mask_logits.dtype))


# Relative offsets are multiplied by this before the MLP, so that the objects of one image (a
# quarter of the side apart, or more) differ by about one unit at its input.
OFFSET_SCALE = 4.0
# Channels of the expression's code in the geometry bias: a few numbers can name a side.
TEXT_CODE_DIM = 8


class RelativeGeometryBias(nn.Module):
    """Mask geometry of every ordered pair of queries -> an additive self-attention logit per head.

    For queries ``i`` (reading) and ``j`` (read), the MLP sees the offset of ``j``'s centre from
    ``i``'s, ``(x_j - x_i, y_j - y_i)``, the log-ratios of their spreads and, with ``text_dim``, a
    ``TEXT_CODE_DIM``-dim code of the expression's mean word feature. Its last layer starts at
    zero, so the bias starts at zero and the decoder starts as Mask2Former's.
    """

    def __init__(self, nheads: int, hidden_dim: int = 32, text_dim: int = 0):
        super().__init__()
        self.text_code = nn.Linear(text_dim, TEXT_CODE_DIM) if text_dim else None
        in_dim = 4 + (TEXT_CODE_DIM if text_dim else 0)
        self.mlp = MLP(in_dim, hidden_dim, nheads, 2)
        nn.init.zeros_(self.mlp.layers[-1].weight)
        nn.init.zeros_(self.mlp.layers[-1].bias)

    def forward(
        self,
        mask_logits: torch.Tensor,
        text: Optional[torch.Tensor] = None,
        text_pad_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``(B, N, H, W)`` mask logits (and, when the bias reads the text, ``text (B, L, C)`` with
        its padding mask) -> ``(B * nheads, N, N)`` float attention bias, row ``i`` for the
        reading query (the layout of ``nn.MultiheadAttention``'s ``attn_mask``)."""
        geometry = mask_geometry(mask_logits)
        centre, spread = geometry[..., :2], geometry[..., 2:].clamp_min(1e-3).log()
        offset = (centre[:, None, :, :] - centre[:, :, None, :]) * OFFSET_SCALE  # [b, i, j]
        size_ratio = spread[:, None, :, :] - spread[:, :, None, :]
        pairs = torch.cat((offset, size_ratio), dim=-1).to(mask_logits.dtype)  # (B, N, N, 4)
        if self.text_code is not None:
            if text is None or text_pad_mask is None:
                raise ValueError("RelativeGeometryBias: built to read the text, called without it")
            code = self.text_code(sentence_feature(text, text_pad_mask))  # (B, TEXT_CODE_DIM)
            pairs = torch.cat((pairs, code[:, None, None, :].expand(*pairs.shape[:3], -1)), -1)
        bias = self.mlp(pairs).permute(0, 3, 1, 2)  # (B, nheads, N, N)
        return bias.flatten(0, 1)
