"""The residual sub-layers every decoder block is made of (batch-first: ``(B, N, C)``).

Each is one attention or feed-forward step with its residual connection and LayerNorm, in
Mask2Former's two flavours: post-norm (``x = norm(x + f(x))``, its default and ours) or pre-norm
(``x = x + f(norm(x))``). Positional embeddings are added to queries and keys; the cross-attention
adds them to its values as well when asked (``positions_in_values``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def with_position(x: torch.Tensor, position: Optional[torch.Tensor]) -> torch.Tensor:
    return x if position is None else x + position


def _xavier_init(module: nn.Module) -> None:
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class _ResidualLayer(nn.Module):
    """What every sub-layer shares: the residual connection, with its LayerNorm on the sub-layer's
    input (pre-norm) or on the sum (post-norm). Subclasses define ``norm``, ``dropout`` and
    ``pre_norm``."""

    norm: nn.LayerNorm
    dropout: nn.Dropout
    pre_norm: bool

    def _input(self, queries: torch.Tensor) -> torch.Tensor:
        return self.norm(queries) if self.pre_norm else queries

    def _add_residual(self, queries: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        out = queries + self.dropout(update)
        return out if self.pre_norm else self.norm(out)


class _AttentionLayer(_ResidualLayer):
    """A multi-head attention sub-layer (the parameters of cross- and self-attention alike).

    ``positions_in_values``: add the keys' positional embeddings to the values as well (each
    subclass says what that means for it).
    """

    def __init__(
        self,
        dim: int,
        nheads: int,
        dropout: float = 0.0,
        pre_norm: bool = False,
        positions_in_values: bool = False,
    ):
        super().__init__()
        self.positions_in_values = positions_in_values
        self.attention = nn.MultiheadAttention(dim, nheads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm
        _xavier_init(self)


class CrossAttentionLayer(_AttentionLayer):
    """Queries attend to a memory (visual tokens, or text tokens in the ReLA-style decoder).

    ``attn_mask`` ``(B * nheads, N, S)`` bool, True = may not attend (the masked attention of
    Mask2Former); ``memory_pad_mask`` ``(B, S)`` bool, True = padding. With ``positions_in_values``
    the memory's positions are added to the values too, not only to the keys: the update then
    carries the attention-weighted position of what the query read.
    """

    def forward(
        self,
        queries: torch.Tensor,
        memory: torch.Tensor,
        *,
        attn_mask: Optional[torch.Tensor] = None,
        memory_pad_mask: Optional[torch.Tensor] = None,
        memory_pos: Optional[torch.Tensor] = None,
        query_pos: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        x = self._input(queries)
        update = self.attention(
            query=with_position(x, query_pos),
            key=with_position(memory, memory_pos),
            value=with_position(memory, memory_pos) if self.positions_in_values else memory,
            attn_mask=attn_mask,
            key_padding_mask=memory_pad_mask,
            need_weights=False,
        )[0]
        return self._add_residual(queries, update)


class SelfAttentionLayer(_AttentionLayer):
    """Queries attend to each other (lets them compete for objects and avoid duplicates).

    With ``positions_in_values`` the queries' positional embeddings are added to the values as
    well: what a query reads from the others then carries where they are, so it can compare
    their positions with its own (its own position enters its content only in this way too).
    """

    def forward(
        self,
        queries: torch.Tensor,
        query_pos: Optional[torch.Tensor] = None,
        attn_bias: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``attn_bias``: ``(B * nheads, N, N)`` float, added to the attention logits."""
        x = self._input(queries)
        q = k = with_position(x, query_pos)
        value = k if self.positions_in_values else x
        update = self.attention(q, k, value=value, attn_mask=attn_bias, need_weights=False)[0]
        return self._add_residual(queries, update)


class FeedForwardLayer(_ResidualLayer):
    """Linear -> ReLU -> Linear with residual and LayerNorm."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0, pre_norm: bool = False):
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden_dim)
        self.linear2 = nn.Linear(hidden_dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm
        _xavier_init(self)

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        x = self._input(queries)
        update = self.linear2(self.dropout(F.relu(self.linear1(x))))
        return self._add_residual(queries, update)


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (the mask-embedding head)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x
