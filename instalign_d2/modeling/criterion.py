"""Training objectives of InstAlign: Phrase-Object Alignment (Eq. 1-3), phrase-aligned instance
supervision (Eq. 7), merged-mask supervision (Eq. 9), no-target supervision and their sum (Eq. 13).

Normalisation (the paper writes Eq. 7 as plain sums over a single expression and says nothing
about batches; ``score_normalization`` chooses):

- ``"num_instances"`` (default, Eq. 7 as written): every term of Eq. 7 — ``l_score * BCE(p, 1)``,
  ``l_mask * L_mask`` and ``l_phrase * L_phrase`` of the matched queries, ``BCE(p, 0)`` of the
  unmatched ones — is summed over the batch and divided by one normaliser, the number of
  ground-truth instances in the batch (averaged over workers, at least 1; Mask2Former's ``num_masks``).
  The ratios between all terms are then the paper's, whatever N and the batch are; a batch of
  no-target expressions only still has a defined loss (normaliser 1);
- ``"mean_over_queries"``: the mask and phrase terms as above, but the score terms a weighted
  mean over all B*N queries (weights ``l_score`` matched, 1 unmatched), our former choice. It
  keeps the score loss O(1) in N, but weakens every score term against the mask and phrase terms
  by about N / (instances per expression): ~77x at N = 100 and ~1.3 instances per expression.

Other reductions: the merged-mask loss is the per-image mean BCE over pixels plus the Dice loss,
averaged over the batch, at the ground truth's resolution (the merged logits are upsampled
bilinearly); the no-target loss is the BCE averaged over the batch.

Not in the paper, off unless the decoder has a category head (``MODEL.INSTALIGN.CATEGORY_CLASSES``):
``loss_category``, the cross-entropy of the category logits of every matched query against its
target's ``category_id``, summed and divided by the same normaliser, times ``category_weight``
(outside lambda_inst, like the other objectives of Eq. 13).

Deep supervision (the paper is silent; Mask2Former's): L_merged and L_inst on every one of the
K + 1 predictions (``merged_loss_on_last_only`` keeps L_merged on the last one only), L_nt on the
last one, which is the only one the no-target head reads.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.projects.point_rend.point_features import (
    get_uncertain_point_coords_with_randomness,
    point_sample,
)
from detectron2.utils import comm
from torch import nn

from ..layers.sigmoid_bce import sigmoid_bce_with_logits
from .loss_settings import PAPER_LOSS_WEIGHTS, LossWeights, PointSampling
from .matcher import PhraseAwareHungarianMatcher

INSTANCE_SUPERVISION_MODES = ("none", "standard", "phrase")
SCORE_LOSS_NORMALIZATIONS = ("num_instances", "mean_over_queries")


def _check_text_mask(text: torch.Tensor, text_mask: torch.Tensor) -> None:
    if text_mask.dtype != torch.bool:
        raise TypeError(
            f"text_mask must be a bool padding mask (True = padding token), got {text_mask.dtype}. "
            "An attention_mask (1 = real token) converts with `attention_mask == 0`."
        )
    if text_mask.shape != text.shape[:2]:
        raise ValueError(
            f"text_mask {tuple(text_mask.shape)} does not match text {tuple(text.shape)} (B, L)"
        )


def phrase_token_weights(
    queries: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor
) -> torch.Tensor:
    """R of Eq. 1: how much each query attends to each token, ``softmax_tokens(Q T^T / sqrt(C))``.

    Args:
        queries: ``(B, N, C)`` object queries Q_k.
        text: ``(B, L, C)`` text features T_k.
        text_mask: ``(B, L)`` bool, True = padding token (the text encoder's ``pad_mask``);
            padding tokens get weight exactly 0.
    Returns:
        ``(B, N, L)``, each row sums to 1 over the valid tokens.
    """
    _check_text_mask(text, text_mask)
    affinity = torch.einsum("bnc,blc->bnl", queries, text) / queries.shape[-1] ** 0.5
    # finfo.min rather than -inf: a (malformed) all-padding expression gives uniform weights, not NaN.
    affinity = affinity.masked_fill(text_mask[:, None, :], torch.finfo(affinity.dtype).min)
    return affinity.softmax(dim=-1)  # Eq. 1


def phrase_alignment_loss(
    queries: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor
) -> torch.Tensor:
    """L_phrase(i) of Eq. 3 for every query: ``1 - cos(P_i, Q_i)`` with ``P = R T`` (Eq. 2).

    Args:
        queries: ``(B, N, C)``; text: ``(B, L, C)``; text_mask: ``(B, L)`` bool, True = padding.
    Returns:
        ``(B, N)`` losses in [0, 2].
    """
    weights = phrase_token_weights(queries, text, text_mask)
    phrases = torch.einsum("bnl,blc->bnc", weights, text)  # Eq. 2
    return 1.0 - F.cosine_similarity(phrases, queries, dim=-1)  # Eq. 3


def bce_dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """L_mask of the paper per row: mean sigmoid BCE over the points plus the Dice loss.

    ``logits``, ``targets``: ``(K, P)`` -> ``(K,)``. An empty target gives ``1 - 1/(|p| + 1)``, which
    pushes the prediction to empty.
    """
    bce = sigmoid_bce_with_logits(logits, targets).mean(dim=1)
    probs = logits.sigmoid()
    dice = 1.0 - (2.0 * (probs * targets).sum(1) + 1.0) / (probs.sum(1) + targets.sum(1) + 1.0)
    return bce + dice


def _uncertainty(logits: torch.Tensor) -> torch.Tensor:
    # Points whose logit is near 0 are the uncertain ones (PointRend / Mask2Former).
    return -logits.abs()


class InstAlignCriterion(nn.Module):
    """Eq. 13 over every decoder prediction (deep supervision); returns named, weighted losses.

    The returned dict's values sum to L_total. Keys: ``loss_merged``, ``loss_score``, ``loss_mask``,
    ``loss_phrase`` for the last block, the same with ``_{k}`` for the earlier predictions (``_0`` =
    the initial queries, ``_k`` = after block k; no ``loss_merged_{k}`` with
    ``merged_loss_on_last_only``), and ``loss_no_target``.
    """

    @configurable
    def __init__(
        self,
        *,
        matcher: PhraseAwareHungarianMatcher,
        weights: LossWeights = PAPER_LOSS_WEIGHTS,
        points: PointSampling = PointSampling(),
        instance_supervision: str = "phrase",
        deep_supervision: bool = True,
        merged_loss_on_last_only: bool = False,
        score_normalization: str = "num_instances",
        category_weight: float = 2.0,
    ):
        """
        Args:
            matcher: the Hungarian matcher (its costs use the same lambdas, Eq. 6).
            weights: the lambdas of L_match (Eq. 6-7) and of Eq. 13.
            points: the importance sampling of the points on which the instance mask losses are
                computed (Mask2Former's setting).
            instance_supervision: Table 3(a): "phrase" (Eq. 6-7), "standard" (no phrase term) or
                "none" (no instance loss: only merged and no-target losses).
            deep_supervision: losses on every block's prediction, not only the last.
            merged_loss_on_last_only: with deep supervision, L_merged on the last prediction only
                (L_inst still on all).
            score_normalization: "num_instances" (Eq. 7 as written) or "mean_over_queries"; see
                the module docstring.
            category_weight: weight of ``loss_category`` when the predictions carry
                ``category_logits`` (not in the paper; see the module docstring).
        """
        super().__init__()
        if instance_supervision not in INSTANCE_SUPERVISION_MODES:
            raise ValueError(
                f"MODEL.INSTALIGN.INSTANCE_SUPERVISION={instance_supervision!r}: choose one of {INSTANCE_SUPERVISION_MODES}."
            )
        if score_normalization not in SCORE_LOSS_NORMALIZATIONS:
            raise ValueError(
                f"MODEL.INSTALIGN.SCORE_LOSS_NORMALIZATION={score_normalization!r}: choose one of "
                f"{SCORE_LOSS_NORMALIZATIONS}."
            )
        self.matcher = matcher
        self.weights = weights
        self.points = points
        self.instance_supervision = instance_supervision
        self.deep_supervision = deep_supervision
        self.merged_loss_on_last_only = merged_loss_on_last_only
        self.score_normalization = score_normalization
        self.category_weight = float(category_weight)

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.INSTALIGN
        return {
            "matcher": PhraseAwareHungarianMatcher(cfg),
            "weights": LossWeights.from_config(cfg),
            "points": PointSampling.from_config(cfg),
            "instance_supervision": c.INSTANCE_SUPERVISION,
            "deep_supervision": c.DEEP_SUPERVISION,
            "merged_loss_on_last_only": c.MERGED_LOSS_ON_LAST_ONLY,
            "score_normalization": c.SCORE_LOSS_NORMALIZATION,
            "category_weight": c.CATEGORY_WEIGHT,
        }

    @property
    def merged_loss_on_every_prediction(self) -> bool:
        """Whether L_merged reads the merged logits of every prediction, not only the last."""
        return self.deep_supervision and not self.merged_loss_on_last_only

    # ------------------------------------------------------------------ the three objectives
    def merged_loss(self, merged_logits: torch.Tensor, gt_merged: torch.Tensor) -> torch.Tensor:
        """L_merged of Eq. 9: ``(B, h, w)`` merged logits vs ``(B, H, W)`` union masks."""
        logits = F.interpolate(
            merged_logits[:, None].float(),
            size=gt_merged.shape[-2:],
            mode="bilinear",
            align_corners=False,
        )
        return bce_dice_loss(logits.flatten(1), gt_merged.flatten(1).float()).mean()

    def instance_losses(
        self,
        prediction: Dict[str, torch.Tensor],
        gt_masks: Sequence[torch.Tensor],
        text_pad_mask: torch.Tensor,
        num_instances: float,
        gt_classes: Optional[Sequence[torch.Tensor]] = None,
    ) -> Dict[str, torch.Tensor]:
        """L_inst of Eq. 7 for one block's prediction, split into its score / mask / phrase terms
        (and ``loss_category`` when the prediction has ``category_logits``)."""
        relevance_logits = prediction["relevance_logits"].float()
        mask_logits = prediction["mask_logits"]
        use_phrase = self.instance_supervision == "phrase"
        phrase = (
            phrase_alignment_loss(prediction["queries"], prediction["text"], text_pad_mask)
            if use_phrase
            else None
        )
        matches = self.matcher(
            relevance_logits.detach(),
            mask_logits.detach(),
            gt_masks,
            None if phrase is None else phrase.detach(),
        )

        batch_index = torch.cat(
            [torch.full_like(pred, b) for b, (pred, _) in enumerate(matches)]
        ).to(relevance_logits.device)
        pred_index = torch.cat([pred for pred, _ in matches]).to(relevance_logits.device)

        # Eq. 7, split into its score, mask and phrase sums; each is divided by the same
        # normaliser (the score sums by a weighted query count under "mean_over_queries").
        # Score terms: matched -> l_score * BCE(p, 1), unmatched -> BCE(p, 0).
        labels = torch.zeros_like(relevance_logits)
        labels[batch_index, pred_index] = 1.0
        weights = torch.ones_like(relevance_logits)
        weights[batch_index, pred_index] = self.weights.score
        score_bce = F.binary_cross_entropy_with_logits(relevance_logits, labels, reduction="none")
        score_normaliser = (
            num_instances if self.score_normalization == "num_instances" else weights.sum()
        )
        losses = {"loss_score": (weights * score_bce).sum() / score_normaliser}

        if pred_index.numel() == 0:  # every expression of the batch is no-target: nothing to match
            zero = mask_logits.sum() * 0.0  # keeps the graph connected for DDP
            losses["loss_mask"] = zero
            if use_phrase:
                losses["loss_phrase"] = zero + phrase.sum() * 0.0
        else:
            matched_gt = torch.cat([gt_masks[b][gt] for b, (_, gt) in enumerate(matches)]).to(
                mask_logits.device
            )
            mask_terms = self.point_sampled_mask_loss(
                mask_logits[batch_index, pred_index], matched_gt
            )
            losses["loss_mask"] = self.weights.mask * mask_terms.sum() / num_instances
            if use_phrase:
                phrase_terms = phrase[batch_index, pred_index]
                losses["loss_phrase"] = self.weights.phrase * phrase_terms.sum() / num_instances
        losses = {k: self.weights.instance * v for k, v in losses.items()}
        if "category_logits" in prediction:
            losses["loss_category"] = self.category_loss(
                prediction["category_logits"], matches, gt_classes, num_instances
            )
        return losses

    def category_loss(
        self,
        category_logits: torch.Tensor,
        matches: Sequence[Tuple[torch.Tensor, torch.Tensor]],
        gt_classes: Optional[Sequence[torch.Tensor]],
        num_instances: float,
    ) -> torch.Tensor:
        """Weighted cross-entropy of the matched queries' ``(B, N, K)`` category logits against
        their targets' categories, summed and divided by the number of instances."""
        if gt_classes is None:
            raise ValueError(
                "InstAlign: the decoder names categories (MODEL.INSTALIGN.CATEGORY_CLASSES > 0) but "
                "the targets carry no 'classes'; the GRES mapper gives them as instances.gt_classes."
            )
        logits, labels = [], []
        for b, (pred, gt) in enumerate(matches):
            logits.append(category_logits[b, pred.to(category_logits.device)])
            labels.append(gt_classes[b][gt].to(category_logits.device))
        logits, labels = torch.cat(logits).float(), torch.cat(labels).long()
        num_classes = category_logits.shape[-1]
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"InstAlign: category_id {labels.max().item()} (or {labels.min().item()}) is outside "
                f"0..{num_classes - 1}: set MODEL.INSTALIGN.CATEGORY_CLASSES above the dataset's "
                "largest category_id."
            )
        if labels.numel() == 0:  # no target in the batch; keeps the graph connected for DDP
            return category_logits.sum() * 0.0
        terms = F.cross_entropy(logits, labels, reduction="none")
        return self.category_weight * terms.sum() / num_instances

    def point_sampled_mask_loss(
        self, mask_logits: torch.Tensor, gt_masks: torch.Tensor
    ) -> torch.Tensor:
        """(BCE + Dice) of matched ``(K, h, w)`` logits vs ``(K, H, W)`` masks on importance-sampled points -> ``(K,)``."""
        logits = mask_logits[:, None].float()
        with torch.no_grad():
            points = get_uncertain_point_coords_with_randomness(
                logits,
                _uncertainty,
                self.points.num_points,
                self.points.oversample_ratio,
                self.points.importance_sample_ratio,
            )
            point_labels = point_sample(gt_masks[:, None].float(), points, align_corners=False)[
                :, 0
            ]
        point_logits = point_sample(logits, points, align_corners=False)[:, 0]
        return bce_dice_loss(point_logits, point_labels)

    def no_target_loss(self, no_target_logits: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
        """L_nt: BCE of p_nt against "the expression has no target"."""
        return F.binary_cross_entropy_with_logits(no_target_logits.float(), empty.float())

    # ------------------------------------------------------------------ Eq. 13
    def forward(
        self, outputs: Dict, targets: List[Dict[str, torch.Tensor]]
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            outputs: the model's ``decode_expressions`` output: ``predictions`` (list over the K + 1
                predictions, each with ``relevance_logits (B, N)``, ``mask_logits (B, N, h, w)``,
                ``queries (B, N, C)``, ``text (B, L, C)``, ``merged_logits (B, h, w)``),
                ``text_pad_mask (B, L)`` and ``no_target_logits (B,)``.
            targets: per expression ``masks`` (M, H, W) bool, ``merged_mask`` (H, W) bool, ``empty`` bool
                and, for the category loss, ``classes`` (M,) int64.
        Returns:
            dict of weighted losses whose sum is L_total (Eq. 13), plus ``loss_category`` when the
            predictions carry category logits.
        """
        predictions = (
            outputs["predictions"] if self.deep_supervision else outputs["predictions"][-1:]
        )
        gt_masks = [t["masks"] for t in targets]
        gt_classes = [t.get("classes") for t in targets]
        if any(c is None for c in gt_classes):
            gt_classes = None
        gt_merged = torch.stack([t["merged_mask"] for t in targets])
        empty = torch.as_tensor([bool(t["empty"]) for t in targets], device=gt_merged.device)
        num_instances = self._num_instances(gt_masks, gt_merged.device)

        losses: Dict[str, torch.Tensor] = {}
        for level, prediction in enumerate(predictions):
            last = level == len(predictions) - 1
            suffix = "" if last else f"_{level}"
            if last or not self.merged_loss_on_last_only:
                losses["loss_merged" + suffix] = self.weights.merged * self.merged_loss(
                    prediction["merged_logits"], gt_merged
                )
            if self.instance_supervision != "none":
                level_losses = self.instance_losses(
                    prediction, gt_masks, outputs["text_pad_mask"], num_instances, gt_classes
                )
                losses.update({k + suffix: v for k, v in level_losses.items()})
        losses["loss_no_target"] = self.weights.no_target * self.no_target_loss(
            outputs["no_target_logits"], empty
        )
        return losses

    @staticmethod
    def _num_instances(gt_masks: Sequence[torch.Tensor], device: torch.device) -> float:
        """Ground-truth instances per worker, averaged over workers, at least 1 (Mask2Former's normaliser)."""
        total = torch.as_tensor(float(sum(m.shape[0] for m in gt_masks)), device=device)
        if comm.get_world_size() > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
        return max(total.item() / comm.get_world_size(), 1.0)

    def extra_repr(self) -> str:
        return (
            f"instance_supervision={self.instance_supervision}, {self.weights}, {self.points}, "
            f"deep_supervision={self.deep_supervision}, "
            f"merged_loss_on_last_only={self.merged_loss_on_last_only}, "
            f"score_normalization={self.score_normalization}, category_weight={self.category_weight}"
        )
