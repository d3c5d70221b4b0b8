"""The numbers of InstAlign's objective, each defined once: the lambdas of Eq. 6-7 and Eq. 13, and
the point sampling of the instance mask loss.

The matcher and the criterion read the same :class:`LossWeights` (Eq. 6's matching cost and Eq. 7's
L_match share their lambdas), so the two cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


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
    """Where the instance mask loss is evaluated (Mask2Former's importance sampling): ``num_points``
    per mask, drawn from ``oversample_ratio`` times as many random candidates, of which the
    ``importance_sample_ratio`` share with the least certain logits is kept (the rest uniform)."""

    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75

    @classmethod
    def from_config(cls, cfg) -> "PointSampling":
        c = cfg.MODEL.INSTALIGN
        return cls(c.TRAIN_NUM_POINTS, c.OVERSAMPLE_RATIO, c.IMPORTANCE_SAMPLE_RATIO)
