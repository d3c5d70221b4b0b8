"""Per-query predictions made after every decoder block (paper §3.4, "Prediction Heads").

From queries Q_k: a relevance logit per query (``p = sigmoid(logit)``) and instance mask logits
``s = V4 . MLP(Q_k)^T`` (Eq. 4) at the stride-4 mask features. The masks also give the next
block's attention mask (Mask2Former's masked attention).
"""

from __future__ import annotations

from typing import Optional, Tuple

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


def slots_within_images(image_index: torch.Tensor) -> torch.Tensor:
    """For each expression, how many expressions of the same image come before it: ``(E,)``."""
    one_hot = F.one_hot(image_index, int(image_index.max()) + 1)
    return (one_hot.cumsum(dim=0) - 1).gather(1, image_index[:, None]).squeeze(1)


def mask_logits_per_image(
    mask_embed: torch.Tensor, mask_features: torch.Tensor, image_index: Optional[torch.Tensor]
) -> torch.Tensor:
    """Eq. 4, ``s = V4 . MLP(Q_k)^T``, for expressions that may share an image.

    ``mask_embed (E, N, D)`` and either ``mask_features (E, D, H, W)`` (one per expression,
    ``image_index`` None) or ``(B, D, H, W)`` per image with ``image_index (E,)`` naming each
    expression's image. In the second case the expressions of each image are laid out side by side
    and multiplied with its features in one product: no copy of V4 per expression, and V4's
    gradient is summed over an image's expressions by the product itself. Returns ``(E, N, H, W)``.
    """
    if image_index is None:
        return torch.einsum("bnd,bdhw->bnhw", mask_embed, mask_features)
    expressions, queries, dim = mask_embed.shape
    images, _, height, width = mask_features.shape
    slot = slots_within_images(image_index)
    side_by_side = mask_embed.new_zeros(images, int(slot.max()) + 1, queries, dim)
    side_by_side[image_index, slot] = mask_embed
    logits = torch.bmm(
        side_by_side.flatten(1, 2), mask_features.flatten(2)
    )  # (B, slots * N, H * W)
    return logits.view(images, -1, queries, height, width)[image_index, slot]


class InstancePredictionHeads(nn.Module):
    """LayerNorm -> (relevance logit, mask embedding); masks by a dot product with V4 (Eq. 4)."""

    def __init__(self, hidden_dim: int, mask_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_dim)
        self.relevance = nn.Linear(hidden_dim, 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    def forward(
        self,
        queries: torch.Tensor,
        mask_features: torch.Tensor,
        image_index: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(B, N, C)`` queries and V4 -> relevance logits ``(B, N)``, mask logits ``(B, N, H/4, W/4)``.

        V4 is ``(B, D, H/4, W/4)``, or one per image with ``image_index`` (see
        :func:`mask_logits_per_image`)."""
        x = self.norm(queries)
        relevance_logits = self.relevance(x).squeeze(-1)
        mask_logits = mask_logits_per_image(self.mask_embed(x), mask_features, image_index)  # Eq. 4
        return relevance_logits, mask_logits
