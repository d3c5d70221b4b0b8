"""How object queries and text interact inside a decoder block.

- :class:`ObjectTextCrossAttention` (POT, paper §3.3): bidirectional. One affinity matrix
  ``A = (Q W_q)(T W_k)^T / sqrt(d)`` per head is read both ways: queries read the text through a
  softmax over tokens, the text reads the queries through a softmax over queries. Both sides get
  their update, a residual and a LayerNorm, so the block refines Q and produces T_k.
- :class:`QueriesReadText` (the ReLA-style ablation of Table 3(e)): plain cross-attention from the
  queries to the text; the text passes through unchanged.

Both take and return ``(queries (B, N, C), text (B, L, C))``; ``text_pad_mask`` ``(B, L)`` is bool
with True = padding token. The queries' positional embedding enters the affinities (as in every
attention of the decoder), never the values; the text carries its positions from the encoder.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .attention_layers import CrossAttentionLayer, _xavier_init, with_position


class ObjectTextCrossAttention(nn.Module):
    """Bidirectional object-text cross-attention sharing one multi-head affinity matrix."""

    def __init__(self, dim: int, nheads: int, dropout: float = 0.0, pre_norm: bool = False):
        super().__init__()
        if dim % nheads:
            raise ValueError(
                f"ObjectTextCrossAttention: hidden dim {dim} is not divisible by {nheads} heads"
            )
        self.nheads = nheads
        self.head_dim = dim // nheads
        self.query_proj = nn.Linear(dim, dim)  # W_q
        self.text_key_proj = nn.Linear(dim, dim)  # W_k
        self.text_value_proj = nn.Linear(dim, dim)  # what queries read from the text
        self.query_value_proj = nn.Linear(dim, dim)  # what the text reads from the queries
        self.query_out_proj = nn.Linear(dim, dim)
        self.text_out_proj = nn.Linear(dim, dim)
        self.query_norm = nn.LayerNorm(dim)
        self.text_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm
        _xavier_init(self)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, S, C) -> (B, h, S, d)
        return x.unflatten(-1, (self.nheads, self.head_dim)).transpose(1, 2)

    @staticmethod
    def _merge_heads(x: torch.Tensor) -> torch.Tensor:  # (B, h, S, d) -> (B, S, C)
        return x.transpose(1, 2).flatten(2)

    def forward(
        self,
        queries: torch.Tensor,
        text: torch.Tensor,
        text_pad_mask: torch.Tensor,
        query_pos: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        q_in = self.query_norm(queries) if self.pre_norm else queries
        t_in = self.text_norm(text) if self.pre_norm else text

        q = self._split_heads(self.query_proj(with_position(q_in, query_pos)))
        k = self._split_heads(self.text_key_proj(t_in))
        affinity = (
            q @ k.transpose(-1, -2) / self.head_dim**0.5
        )  # (B, h, N, L), shared by both directions

        # Queries read text: softmax over the valid tokens (finfo.min, not -inf: no NaN for a
        # malformed all-padding row).
        pad = text_pad_mask[:, None, None, :]
        to_text = affinity.masked_fill(pad, torch.finfo(affinity.dtype).min).softmax(dim=-1)
        query_update = self.query_out_proj(
            self._merge_heads(to_text @ self._split_heads(self.text_value_proj(t_in)))
        )

        # Text reads queries: softmax over the queries, from the same affinities.
        to_queries = affinity.transpose(-1, -2).softmax(dim=-1)  # (B, h, L, N)
        text_update = self.text_out_proj(
            self._merge_heads(to_queries @ self._split_heads(self.query_value_proj(q_in)))
        )

        queries = queries + self.dropout(query_update)
        text = text + self.dropout(text_update)
        if not self.pre_norm:
            queries, text = self.query_norm(queries), self.text_norm(text)
        return queries, text


class QueriesReadText(nn.Module):
    """One-way cross-attention from the queries to the words (text not refined)."""

    def __init__(self, dim: int, nheads: int, dropout: float = 0.0, pre_norm: bool = False):
        super().__init__()
        self.cross_attention = CrossAttentionLayer(dim, nheads, dropout=dropout, pre_norm=pre_norm)

    def forward(
        self,
        queries: torch.Tensor,
        text: torch.Tensor,
        text_pad_mask: torch.Tensor,
        query_pos: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        queries = self.cross_attention(
            queries, text, memory_pad_mask=text_pad_mask, query_pos=query_pos
        )
        return queries, text
