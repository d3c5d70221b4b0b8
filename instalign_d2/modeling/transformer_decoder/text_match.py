"""A relevance term that compares each query with the expression directly.

The paper is silent on how the relevance score of a query is computed beyond "from the object
queries"; ours is a linear layer on each query (:mod:`.prediction_heads`). Whether a query's
object is what the expression names is then read from one vector in which the POT blocks have
mixed the object's features and the words it attended to. Telling "the square" from "the circle"
that way asks a linear read-out to compare two mixed-in codes, and on the synthetic set the
trained model does it for colours and poorly for shapes: the no-target expressions whose only
absent attribute is the shape are found 40-56 % of the time, those whose only absent attribute is
the colour 82-96 %, and "the square" often picks a circle.

With ``MODEL.INSTALIGN.TEXT_MATCH_SCORE`` every relevance logit also gets a bilinear match between
the query and the expression's mean word feature, ``(A q_i) . (B T_sen) / sqrt(C)``, the score of
two-tower retrieval models (and of MDETR's contrastive alignment), so that a shape word and a
query of that shape can agree by a dot product. ``B`` starts at zero: the term starts at zero, and
the model starts as the plain one.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..aggregation import sentence_feature


class TextMatchScore(nn.Module):
    """Relevance logits, queries and the text -> relevance logits plus ``(A q_i) . (B T_sen) / sqrt(C)``."""

    def __init__(self, hidden_dim: int, text_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_dim)
        self.query_proj = nn.Linear(hidden_dim, hidden_dim)  # A
        self.text_proj = nn.Linear(text_dim, hidden_dim)  # B, zero: the term starts at zero
        nn.init.zeros_(self.text_proj.weight)
        nn.init.zeros_(self.text_proj.bias)
        self.scale = 1.0 / math.sqrt(hidden_dim)

    def forward(
        self,
        relevance_logits: torch.Tensor,
        queries: torch.Tensor,
        text: torch.Tensor,
        text_pad_mask: torch.Tensor,
    ) -> torch.Tensor:
        """``(B, N)`` relevance logits, ``(B, N, C)`` queries, ``(B, L, C)`` text with its
        ``(B, L)`` padding mask -> ``(B, N)`` relevance logits with the match term."""
        query_codes = self.query_proj(self.norm(queries))  # (B, N, C)
        text_code = self.text_proj(sentence_feature(text, text_pad_mask))  # (B, C)
        term = torch.einsum("bnc,bc->bn", query_codes, text_code) * self.scale
        return relevance_logits + term.to(relevance_logits.dtype)
