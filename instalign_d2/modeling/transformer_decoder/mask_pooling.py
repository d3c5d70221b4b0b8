"""Each query gets the pixel features pooled over its current mask before every block.

The paper is silent on what a query holds of its object beyond what Mask2Former's masked
cross-attention reads. On the synthetic set that reading keeps colour and size and loses the
shape: linear probes (``tools/probe_features.py --queries``) read an object's shape from the pixel
decoder's stride-8 map pooled over the object at 93 %, and from the trained tiny model's last
query of that object at 53 % (colour 85 %, size 89 %). A shape the query does not hold cannot be
matched with a shape word, and the expressions that name an absent shape are the no-target
expressions the model misses most.

With ``MODEL.INSTALIGN.MASK_POOLED_QUERIES`` every query gets, before each POT block, a linear map
of the finest visual level (V3, stride 8) averaged over its current mask (the mask's probabilities
as weights; the mask carries no gradient here, it is only where to look), as mask pooling feeds
object features to the queries in kMaX-DeepLab and FC-CLIP. The maps start at zero: the decoder
starts as the plain one.
"""

from __future__ import annotations

import torch
from torch import nn

from instalign_d2.layers.mask_average import average_over_masks


def pool_over_masks(features: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` features and ``(B, N, H, W)`` mask logits -> ``(B, N, C)``: the features
    averaged over each mask, its probabilities (detached) as weights."""
    return average_over_masks(features, mask_logits.detach().sigmoid())


class MaskPooledQueryUpdate(nn.Module):
    """Before block ``k``: ``Q <- Q + W_k · pool(V3, masks)``, one zero-initialised ``W_k`` per block."""

    def __init__(self, in_channels: int, hidden_dim: int, num_blocks: int):
        super().__init__()
        self.projections = nn.ModuleList(
            nn.Linear(in_channels, hidden_dim) for _ in range(num_blocks)
        )
        for projection in self.projections:
            nn.init.zeros_(projection.weight)
            nn.init.zeros_(projection.bias)

    def forward(
        self, block: int, queries: torch.Tensor, features: torch.Tensor, mask_logits: torch.Tensor
    ) -> torch.Tensor:
        """``(B, N, C)`` queries, ``(B, in_channels, h, w)`` V3, ``(B, N, H, W)`` mask logits ->
        the queries with block ``block``'s map of their mask-pooled features added."""
        pooled = pool_over_masks(features, mask_logits)
        return queries + self.projections[block](pooled).to(queries.dtype)
