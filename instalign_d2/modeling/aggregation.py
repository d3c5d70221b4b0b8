"""Adaptive Instance Aggregation (paper §3.5) and the No-Target Predictor (§3.6).

Both turn the decoder's per-query predictions into the expression-level answer: one merged
mask, and the probability that the expression refers to nothing in the image.
"""

from __future__ import annotations

from typing import Optional

import torch
from detectron2.config import configurable
from torch import nn

AGGREGATION_MODES = ("AIA", "AIA_NO_PRELU", "THRESHOLD")
NO_TARGET_INPUTS = ("QGLOBAL_TSEN", "QGLOBAL", "TSEN", "MEAN_QUERIES")

# Logit of a pixel that no selected instance covers in the THRESHOLD variant: sigmoid(-10) ~ 5e-5,
# i.e. "background" with a finite BCE (no gradient flows through it).
EMPTY_MASK_LOGIT = -10.0


def aggregate_instances(
    mask_logits: torch.Tensor, scores: torch.Tensor, prelu: Optional[nn.Module]
) -> torch.Tensor:
    """Merged-mask logits of Eq. 8 before its sigmoid: ``sum_i p_i * PReLU(s_i)``.

    Args:
        mask_logits: ``(B, N, H, W)`` instance mask logits ``s_i``.
        scores: ``(B, N)`` relevance probabilities ``p_i`` (sigmoid of the relevance logits).
        prelu: the learnable PReLU; ``None`` means identity (the "AIA without PReLU" ablation).
    Returns:
        ``(B, H, W)`` merged logits; ``sigmoid`` of them is M_merged.
    """
    if mask_logits.dim() != 4 or scores.shape != mask_logits.shape[:2]:
        raise ValueError(
            f"aggregate_instances: expected mask_logits (B, N, H, W) and scores (B, N), got "
            f"{tuple(mask_logits.shape)} and {tuple(scores.shape)}"
        )
    activated = prelu(mask_logits) if prelu is not None else mask_logits
    return torch.einsum(
        "bn,bnhw->bhw", scores.to(activated.dtype), activated
    )  # Eq. 8 (inside the sigmoid)


def aggregate_by_threshold(
    mask_logits: torch.Tensor, scores: torch.Tensor, threshold: float
) -> torch.Tensor:
    """The fixed-threshold baseline of Table 3(b): the union of the instances scoring above ``threshold``.

    The union of probability masks is their pixel-wise maximum; since the sigmoid is monotonic that
    is the maximum of the selected instances' logits. Pixels of an image with no selected instance
    get :data:`EMPTY_MASK_LOGIT`. Hard selection: no gradient reaches the scores through this path.
    """
    selected = (scores > threshold)[:, :, None, None]
    empty = torch.full_like(mask_logits, EMPTY_MASK_LOGIT)
    return torch.where(selected, mask_logits, empty).amax(dim=1)


class InstanceAggregation(nn.Module):
    """Merges the N instance masks into the expression's mask (Eq. 8 and its Table 3(b) variants)."""

    @configurable
    def __init__(self, *, mode: str = "AIA", prelu_init: float = 0.25, threshold: float = 0.5):
        """
        Args:
            mode: "AIA" (Eq. 8, learnable PReLU), "AIA_NO_PRELU" (Eq. 8 with identity) or
                "THRESHOLD" (union of the instances whose score exceeds ``threshold``).
            prelu_init: initial negative slope of the PReLU.
            threshold: score threshold of the "THRESHOLD" mode.
        """
        super().__init__()
        if mode not in AGGREGATION_MODES:
            raise ValueError(
                f"MODEL.INSTALIGN.AGGREGATION={mode!r}: choose one of {AGGREGATION_MODES}."
            )
        self.mode = mode
        self.threshold = threshold
        # One slope shared by all pixels and instances: PReLU(s) keeps foreground evidence and damps
        # (learnably) the negative background logits before they are summed.
        self.prelu = nn.PReLU(num_parameters=1, init=prelu_init) if mode == "AIA" else None

    @classmethod
    def from_config(cls, cfg):
        return {
            "mode": cfg.MODEL.INSTALIGN.AGGREGATION,
            "prelu_init": cfg.MODEL.INSTALIGN.PRELU_INIT,
            "threshold": cfg.MODEL.INSTALIGN.AGGREGATION_THRESHOLD,
        }

    def forward(self, mask_logits: torch.Tensor, relevance_logits: torch.Tensor) -> torch.Tensor:
        """``(B, N, H, W)`` mask logits and ``(B, N)`` relevance logits -> ``(B, H, W)`` merged logits."""
        scores = relevance_logits.sigmoid()  # p_i
        if self.mode == "THRESHOLD":
            return aggregate_by_threshold(mask_logits, scores, self.threshold)
        return aggregate_instances(mask_logits, scores, self.prelu)


def sentence_feature(text: torch.Tensor, text_pad_mask: torch.Tensor) -> torch.Tensor:
    """T_sen: mean of the valid (non-padding) word features. ``text (B, L, C)``, ``text_pad_mask (B, L)`` True = padding."""
    valid = (~text_pad_mask).to(text.dtype).unsqueeze(-1)
    return (text * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1.0)


class NoTargetHead(nn.Module):
    """No-Target Predictor (Eq. 10-12) and the inputs compared in Table 3(c).

    The MLP (its depth is not given in the paper) is Linear -> ReLU -> Linear -> one logit;
    ``sigmoid`` of the logit is p_nt.
    """

    @configurable
    def __init__(self, *, hidden_dim: int, input_mode: str = "QGLOBAL_TSEN"):
        """
        Args:
            hidden_dim: C, the width of the queries and text features.
            input_mode: "QGLOBAL_TSEN" (Eq. 11), "QGLOBAL", "TSEN" or "MEAN_QUERIES" (unweighted
                mean of the queries, as ReLA / LQMFormer).
        """
        super().__init__()
        if input_mode not in NO_TARGET_INPUTS:
            raise ValueError(
                f"MODEL.INSTALIGN.NO_TARGET_INPUT={input_mode!r}: choose one of {NO_TARGET_INPUTS}."
            )
        self.input_mode = input_mode
        in_dim = 2 * hidden_dim if input_mode == "QGLOBAL_TSEN" else hidden_dim
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, 1)
        )

    @classmethod
    def from_config(cls, cfg):
        return {
            "hidden_dim": cfg.MODEL.INSTALIGN.HIDDEN_DIM,
            "input_mode": cfg.MODEL.INSTALIGN.NO_TARGET_INPUT,
        }

    def features(
        self,
        queries: torch.Tensor,
        relevance_logits: torch.Tensor,
        text: torch.Tensor,
        text_pad_mask: torch.Tensor,
    ) -> torch.Tensor:
        """The MLP's input: ``(B, 2C)`` for Q_nt of Eq. 11, ``(B, C)`` for the other modes."""
        if self.input_mode == "MEAN_QUERIES":
            return queries.mean(dim=1)
        if self.input_mode == "TSEN":
            return sentence_feature(text, text_pad_mask)
        global_query = torch.einsum("bn,bnc->bc", relevance_logits.sigmoid(), queries)  # Eq. 10
        if self.input_mode == "QGLOBAL":
            return global_query
        return torch.cat([global_query, sentence_feature(text, text_pad_mask)], dim=-1)  # Eq. 11

    def forward(
        self,
        queries: torch.Tensor,
        relevance_logits: torch.Tensor,
        text: torch.Tensor,
        text_pad_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Q_K ``(B, N, C)``, relevance logits ``(B, N)``, T_K ``(B, L, C)``, padding mask -> ``(B,)`` logit of p_nt (Eq. 12)."""
        return self.mlp(self.features(queries, relevance_logits, text, text_pad_mask)).squeeze(-1)
