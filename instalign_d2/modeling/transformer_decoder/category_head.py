"""An auxiliary head that asks every matched query to name its object's category.

The paper supervises a query through its relevance score, its mask and its phrase alignment
(Eq. 7); nothing asks it to keep *what* its object is. On the synthetic set the last block's
queries that cover an object hold its shape at 53 % (a linear probe, five shapes) while the map
they read, pooled over the same object, holds it at 93 %; the no-target expressions whose only
absent attribute is the shape are the ones the model misses. Mask2Former's queries keep their
object's class because a classification loss asks for it.

With ``MODEL.INSTALIGN.CATEGORY_CLASSES > 0`` every prediction also gives category logits per
query, and the criterion adds a cross-entropy on the queries the matcher assigned to a target
(``loss_category``, weighted by ``MODEL.INSTALIGN.CATEGORY_WEIGHT``). The label is the target's
``category_id`` (the shape on the synthetic set, the COCO category on gRefCOCO). The head is read
by the loss alone: inference and the matcher do not use it.
"""

from __future__ import annotations

import torch
from torch import nn


class QueryCategoryHead(nn.Module):
    """``(B, N, C)`` queries -> ``(B, N, num_classes)`` category logits (LayerNorm, linear)."""

    def __init__(self, hidden_dim: int, num_classes: int):
        super().__init__()
        if num_classes < 2:
            raise ValueError(
                f"MODEL.INSTALIGN.CATEGORY_CLASSES={num_classes}: a category head needs at least 2 "
                "classes (0 turns it off); set it above the largest category_id of the dataset."
            )
        self.num_classes = num_classes
        self.norm = nn.LayerNorm(hidden_dim)
        self.classifier = nn.Linear(hidden_dim, num_classes)

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.norm(queries))
