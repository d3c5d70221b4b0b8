"""Per-query predictions made after every decoder block (paper §3.4, "Prediction Heads").

From queries Q_k: a relevance logit per query (``p = sigmoid(logit)``) and instance mask logits
``s = V4 . MLP(Q_k)^T`` (Eq. 4) at the stride-4 mask features. The masks also give the next
block's attention mask (Mask2Former's masked attention).
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention_layers import MLP


def masked_attention_mask(
    mask_logits: torch.Tensor, size: Tuple[int, int], nheads: int
) -> torch.Tensor:
    """Mask2Former's attention mask from the previous prediction.

    A query may attend only to the pixels of ``size`` where its (resized) mask probability is at
    least 0.5. A query whose mask is empty would attend to nothing (and give NaN), so such rows are
    left unmasked. Returns ``(B * nheads, N, h * w)`` bool, True = may not attend; no gradient.
    """
    resized = F.interpolate(
        mask_logits.detach().float(), size=size, mode="bilinear", align_corners=False
    )
    blocked = resized.sigmoid().flatten(2) < 0.5  # (B, N, h*w)
    blocked = blocked & ~blocked.all(dim=-1, keepdim=True)  # unmask rows that would be fully masked
    return blocked.repeat_interleave(nheads, dim=0)


class InstancePredictionHeads(nn.Module):
    """LayerNorm -> (relevance logit, mask embedding); masks by a dot product with V4 (Eq. 4)."""

    def __init__(self, hidden_dim: int, mask_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_dim)
        self.relevance = nn.Linear(hidden_dim, 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    def forward(
        self, queries: torch.Tensor, mask_features: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(B, N, C)`` queries and ``(B, D, H/4, W/4)`` V4 -> relevance logits ``(B, N)``, mask logits ``(B, N, H/4, W/4)``."""
        x = self.norm(queries)
        relevance_logits = self.relevance(x).squeeze(-1)
        mask_logits = torch.einsum("bnd,bdhw->bnhw", self.mask_embed(x), mask_features)  # Eq. 4
        return relevance_logits, mask_logits
