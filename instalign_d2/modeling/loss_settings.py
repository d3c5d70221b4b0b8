"""The numbers of InstAlign's objective, each defined once: the lambdas of Eq. 6-7 and Eq. 13, and
the point sampling of the instance mask loss.

The matcher and the criterion read the same :class:`LossWeights` (Eq. 6's matching cost and Eq. 7's
L_match share their lambdas), so the two cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Tuple

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossWeights:
    """The lambdas: the first three weigh the terms of L_match in the matching cost (Eq. 6) and in
    the loss (Eq. 7), the last three the objectives in L_total (Eq. 13). ``PAPER_LOSS_WEIGHTS``
    holds supp. §8's values."""

    score: float
    """lambda_score: the relevance score term, BCE(p, 1) of a matched query."""
    mask: float
    """lambda_mask: the mask term, BCE + Dice of a matched query's mask."""
    phrase: float
    """lambda_phrase: the Phrase-Object Alignment term L_phrase (Eq. 3)."""
    merged: float
    """lambda_merged: L_merged (Eq. 9) in Eq. 13."""
    instance: float
    """lambda_inst: L_inst (Eq. 7) in Eq. 13."""
    no_target: float
    """lambda_nt: L_nt in Eq. 13."""

    @classmethod
    def from_config(cls, cfg) -> "LossWeights":
        c = cfg.MODEL.INSTALIGN
        weights = cls(
            c.COST_SCORE,
            c.COST_MASK,
            c.COST_PHRASE,
            c.MERGED_WEIGHT,
            c.INSTANCE_WEIGHT,
            c.NO_TARGET_WEIGHT,
        )
        # "standard" instance supervision (Table 3(a)) has no phrase term, in the cost or the loss.
        return weights if c.INSTANCE_SUPERVISION == "phrase" else replace(weights, phrase=0.0)


PAPER_LOSS_WEIGHTS = LossWeights(
    score=2.0, mask=5.0, phrase=1.0, merged=5.0, instance=1.0, no_target=0.1
)


@dataclass(frozen=True)
class PointSampling:
    """Where the mask losses are evaluated.

    By default Mask2Former's importance sampling for the instance masks: ``num_points`` per mask,
    drawn from ``oversample_ratio`` times as many random candidates, of which the
    ``importance_sample_ratio`` share with the least certain logits is kept (the rest uniform);
    the merged mask at the ground truth's resolution. With ``at_logit_grid`` every mask loss and
    matching cost is evaluated at the cells of the mask logits instead, against the ground truth
    resampled to their centres: when the logits have fewer cells than ``num_points`` (the tiny
    config's 32 x 32), that is every point the logits define, without sampling or upsampling.
    """

    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    at_logit_grid: bool = False

    @classmethod
    def from_config(cls, cfg) -> "PointSampling":
        c = cfg.MODEL.INSTALIGN
        return cls(
            c.TRAIN_NUM_POINTS,
            c.OVERSAMPLE_RATIO,
            c.IMPORTANCE_SAMPLE_RATIO,
            c.MASK_LOSS_AT_LOGIT_GRID,
        )


def resample_to_grid(masks: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """``(..., H, W)`` masks -> ``(..., h, w)`` float: their bilinear value at the centres of an
    ``h x w`` grid of cells (what point sampling at those centres would read)."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks.float()
    flat = masks.reshape(-1, 1, *masks.shape[-2:]).float()
    resampled = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return resampled.reshape(*masks.shape[:-2], *size)
