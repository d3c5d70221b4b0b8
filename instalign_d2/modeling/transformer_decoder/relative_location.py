"""A relevance term from where each instance lies among the expression's candidates.

The paper is silent on how the relevance score of a query is computed beyond "from the object
queries"; ours is a linear layer on each query (:mod:`.prediction_heads`). A spatial expression
("the leftmost small shape") asks for an order among the instances the rest of the expression
selects: the query of the left small shape and that of the right one must get opposite scores,
although each, alone, is "a small shape". A score read from one query at a time has to learn that
order through the self-attention, and on the synthetic set it does not (the spatial words are
not read at all).

With ``MODEL.INSTALIGN.RELATIVE_LOCATION_SCORE`` the relevance logit of every prediction gets a
term in the spirit of the location module of MAttNet (Yu et al. 2018), which scores an object's
offsets to the objects of its kind against a location phrase: each query's mask centre, as a
z-score among the current candidates (the queries weighted by their relevance), times two
coefficients the expression sets (one per axis, a linear map of its mean word feature). "leftmost"
can then make the x-coefficient negative, so the candidate lying furthest left gains and the one
furthest right loses, whatever their kind. The coefficients start at zero: the term starts at
zero, and the model starts as the plain one.
"""

from __future__ import annotations

import torch
from torch import nn

from ..aggregation import sentence_feature
from .mask_positions import mask_geometry

# Candidates' spreads below this (a twentieth of the side) count as this: with one candidate, or
# candidates on top of each other, the z-scores stay bounded.
MIN_SPREAD = 0.05
# |z| above this is cut: the extreme of a group of up to 5 equally weighted candidates lies within
# 2 standard deviations of their mean, and an outlier far from the group must not take over.
MAX_Z = 2.0


def candidate_z_scores(centres: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``(B, N, 2)`` centres and ``(B, N)`` non-negative candidate weights -> ``(B, N, 2)``: each
    centre minus the weighted mean of the candidates' centres, over their weighted standard
    deviation (per axis, at least :data:`MIN_SPREAD`), clamped to ``±MAX_Z``."""
    w = weights[..., None]
    total = w.sum(1, keepdim=True).clamp_min(1e-6)
    mean = (w * centres).sum(1, keepdim=True) / total
    spread = ((w * (centres - mean) ** 2).sum(1, keepdim=True) / total).sqrt()
    return ((centres - mean) / spread.clamp_min(MIN_SPREAD)).clamp(-MAX_Z, MAX_Z)


class RelativeLocationScore(nn.Module):
    """Relevance logits, mask logits and the text -> relevance logits plus the location term.

    ``logit_i + p_i * (a(T) . z_i)``: ``z_i`` the z-score of query ``i``'s mask centre among the
    candidates (weights ``p = sigmoid(logit)``), ``a(T)`` two coefficients from the expression's
    mean word feature. The factor ``p_i`` keeps the term to the candidates: a query the score has
    already ruled out is not brought back for lying at the right end. The geometry and the weights
    carry no gradient (the term orders candidates; it does not move masks or choose them); the
    coefficients, and through them the text, do.
    """

    def __init__(self, text_dim: int):
        super().__init__()
        self.coefficients = nn.Linear(text_dim, 2)  # (x, y)
        nn.init.zeros_(self.coefficients.weight)
        nn.init.zeros_(self.coefficients.bias)

    def forward(
        self,
        relevance_logits: torch.Tensor,
        mask_logits: torch.Tensor,
        text: torch.Tensor,
        text_pad_mask: torch.Tensor,
    ) -> torch.Tensor:
        """``(B, N)`` relevance logits, ``(B, N, H, W)`` mask logits, ``(B, L, C)`` text with its
        ``(B, L)`` padding mask -> ``(B, N)`` relevance logits with the location term."""
        weights = relevance_logits.detach().float().sigmoid()
        z = candidate_z_scores(mask_geometry(mask_logits)[..., :2], weights)
        coefficients = self.coefficients(sentence_feature(text, text_pad_mask))  # (B, 2)
        term = weights * (z.to(coefficients.dtype) * coefficients[:, None, :]).sum(-1)
        return relevance_logits + term.to(relevance_logits.dtype)
