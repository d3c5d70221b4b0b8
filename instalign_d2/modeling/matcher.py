"""Phrase-aware Hungarian matching of the N predicted instances to the M ground-truth instances.

Eq. 5 picks the assignment minimising the summed cost of Eq. 6:
``cost(i, j) = l_score * BCE(p_i, 1) + l_mask * (BCE + Dice)(s_i, s_j) + l_phrase * L_phrase(i)``.
As Mask2Former's matcher, the mask costs are computed on points drawn uniformly at random (the
same points for every prediction/ground-truth pair of the batch), which is far cheaper than full
masks; the costs of all expressions of a batch are computed together.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.projects.point_rend.point_features import point_sample
from scipy.optimize import linear_sum_assignment
from torch import nn

from ..layers.sigmoid_bce import softplus
from .loss_settings import PAPER_LOSS_WEIGHTS, LossWeights


def pairwise_bce_cost(pred_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean per-point sigmoid BCE between every prediction ``(N, P)`` and every target ``(M, P)`` -> ``(N, M)``."""
    # BCE(x, t) = t softplus(-x) + (1 - t) softplus(x) = softplus(-x) + (1 - t) x: one softplus
    # (the slow part on the CPU) and one product for all pairs.
    loss_if_one = softplus(-pred_logits).sum(-1, keepdim=True)  # sum of -log(sigmoid(x))
    return (loss_if_one + pred_logits @ (1.0 - targets).T) / pred_logits.shape[1]


def pairwise_dice_cost(pred_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice loss ``1 - (2|p.t| + 1) / (|p| + |t| + 1)`` between every prediction and every target -> ``(N, M)``."""
    probs = pred_logits.sigmoid()
    intersection = 2.0 * probs @ targets.T
    sizes = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1.0 - (intersection + 1.0) / (sizes + 1.0)


class PhraseAwareHungarianMatcher(nn.Module):
    """One-to-one assignment of predictions to ground-truth instances, per image (Eq. 5-6)."""

    @configurable
    def __init__(self, *, weights: LossWeights = PAPER_LOSS_WEIGHTS, num_points: int = 12544):
        """
        Args:
            weights: lambda_score, lambda_mask, lambda_phrase of Eq. 6 are ``weights.score``,
                ``.mask``, ``.phrase`` (phrase = 0 is "standard" instance supervision).
            num_points: points sampled per image for the mask costs.
        """
        super().__init__()
        self.weights = weights
        self.num_points = num_points

    @classmethod
    def from_config(cls, cfg):
        return {
            "weights": LossWeights.from_config(cfg),
            "num_points": cfg.MODEL.INSTALIGN.TRAIN_NUM_POINTS,
        }

    def batched_cost_matrices(
        self,
        relevance_logits: torch.Tensor,
        mask_logits: torch.Tensor,
        gt_masks: Sequence[torch.Tensor],
        phrase_costs: Optional[torch.Tensor] = None,
    ) -> List[torch.Tensor]:
        """Eq. 6 for every expression of the batch at once -> B matrices ``(N, M_b)``.

        One set of random points serves the whole batch, so the point sampling and the pairwise
        costs are a few large tensor operations instead of one small set per expression.
        """
        batch, num_queries = relevance_logits.shape
        relevance_logits, mask_logits = relevance_logits.float(), mask_logits.float()
        counts = [int(m.shape[0]) for m in gt_masks]
        if sum(counts) == 0:
            return [relevance_logits.new_zeros((num_queries, 0)) for _ in range(batch)]
        points = torch.rand(1, self.num_points, 2, device=mask_logits.device)
        pred_points = point_sample(
            mask_logits.flatten(0, 1)[:, None],
            points.expand(batch * num_queries, -1, -1),
            align_corners=False,
        )[
            :, 0
        ]  # (B*N, P)
        all_gt = torch.cat([m for m in gt_masks if m.shape[0]]).to(mask_logits.device)
        gt_points = point_sample(
            all_gt[:, None].float(), points.expand(all_gt.shape[0], -1, -1), align_corners=False
        )[
            :, 0
        ]  # (sum M, P)

        # Every prediction against every ground truth of the batch; each expression keeps its block.
        mask_cost = pairwise_bce_cost(pred_points, gt_points) + pairwise_dice_cost(
            pred_points, gt_points
        )
        per_query = self.weights.score * F.softplus(-relevance_logits)  # BCE(p_i, 1) = -log p_i
        if self.weights.phrase and phrase_costs is not None:
            per_query = per_query + self.weights.phrase * phrase_costs.float()  # Eq. 6, phrase term
        costs, offset = [], 0
        for b, count in enumerate(counts):
            block = mask_cost[b * num_queries : (b + 1) * num_queries, offset : offset + count]
            costs.append(per_query[b][:, None] + self.weights.mask * block)  # Eq. 6
            offset += count
        return costs

    @torch.no_grad()
    def forward(
        self,
        relevance_logits: torch.Tensor,
        mask_logits: torch.Tensor,
        gt_masks: Sequence[torch.Tensor],
        phrase_costs: Optional[torch.Tensor] = None,
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Match every image of the batch.

        Args:
            relevance_logits: ``(B, N)``.
            mask_logits: ``(B, N, h, w)``.
            gt_masks: B tensors ``(M_b, H, W)`` (bool or float); ``M_b = 0`` for a no-target expression.
            phrase_costs: ``(B, N)`` L_phrase of every query, or None (no phrase term).
        Returns:
            B pairs ``(prediction_indices, gt_indices)`` of int64 tensors of length ``min(N, M_b)``
            (empty for ``M_b = 0``), sorted by prediction index, as ``linear_sum_assignment`` gives them.
        """
        costs = self.batched_cost_matrices(relevance_logits, mask_logits, gt_masks, phrase_costs)
        matches = []
        for cost in costs:
            if cost.shape[1] == 0:
                empty = torch.empty(0, dtype=torch.int64)
                matches.append((empty, empty.clone()))
                continue
            cost = cost.cpu()
            if not torch.isfinite(cost).all():
                raise FloatingPointError(
                    "PhraseAwareHungarianMatcher: the matching cost has NaN/inf entries; the model's predictions "
                    "diverged (lower SOLVER.BASE_LR or enable SOLVER.CLIP_GRADIENTS)."
                )
            rows, cols = linear_sum_assignment(cost.numpy())
            matches.append(
                (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
            )
        return matches

    def extra_repr(self) -> str:
        w = self.weights
        return (
            f"cost_score={w.score}, cost_mask={w.mask}, cost_phrase={w.phrase}, "
            f"num_points={self.num_points}"
        )
