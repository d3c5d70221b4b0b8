"""A per-pixel category loss on the mask features (not in the paper, nor in Mask2Former's loss).

The instance masks of InstAlign are dot products of each query with the mask features V4
(Mask2Former's mask head), so what V4 keeps of the objects bounds how well any query can carve
them. Early in training the instance masks are what the model lacks most: the best query of a
short schedule reaches a referred object far below what it reaches at the end. This head asks V4
to name, at every cell, the category of the object there (0: background) with a 1 x 1 convolution
and a cross-entropy over every object of the image, referred to or not. The expressions and the
no-target decision see nothing of it but the features it shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = 255  # cells of the padding


class DenseCategoryHead(nn.Module):
    """``num_classes`` logits per cell of the mask features (class 0: no object)."""

    def __init__(self, mask_dim: int, num_classes: int, weight: float):
        super().__init__()
        if num_classes < 2:
            raise ValueError(
                f"MODEL.INSTALIGN.CATEGORY_CLASSES={num_classes}: the dense category loss needs the "
                "background and at least one category (more than the largest category_id)"
            )
        self.classifier = nn.Conv2d(mask_dim, num_classes, kernel_size=1)
        self.num_classes = num_classes
        self.weight = float(weight)

    def forward(self, mask_features: torch.Tensor) -> torch.Tensor:
        return self.classifier(mask_features)

    def loss(self, mask_features: torch.Tensor, category_maps: torch.Tensor) -> torch.Tensor:
        """``weight`` times the mean cross-entropy over the cells.

        Args:
            mask_features: ``(I, D, h, w)``, V4 of I images.
            category_maps: ``(I, Hp, Wp)`` integer category of each input pixel (0 background,
                ``IGNORE_INDEX`` padding), at the padded input size; taken at the cell centres
                (nearest), as the masks' 1/4 resolution sees them.
        """
        logits = self(mask_features)
        targets = F.interpolate(
            category_maps[:, None].float(), size=logits.shape[-2:], mode="nearest-exact"
        )[:, 0].long()
        valid = targets[targets != IGNORE_INDEX]
        if valid.numel() and int(valid.max()) >= self.num_classes:
            raise ValueError(
                f"a category id {int(valid.max())} is not below MODEL.INSTALIGN.CATEGORY_CLASSES="
                f"{self.num_classes}: raise it above the largest category_id of the train split"
            )
        return self.weight * F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
