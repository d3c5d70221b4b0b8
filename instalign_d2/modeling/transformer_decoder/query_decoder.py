"""Query decoders: the Phrase-Object Transformer (paper §3.3) and the Table 3(e) ablations.

All three share Mask2Former's skeleton: N learned query features with learned positional
embeddings; K blocks, block k reading the visual level ``V_{k mod 3}`` (strides 32, 16, 8 in turn,
sine positions + a level embedding) through masked cross-attention; prediction heads on the initial
queries and after every block (deep supervision). They differ in how the text enters a block:

================================  ===========================================================
``PhraseObjectTransformer`` POT   bidirectional Object-Text Cross Attention: refines Q and T
``ReLAStyleDecoder``        RELA  queries read the text (cross-attention); T unchanged
``Mask2FormerDecoder``      M2F   no text in the decoder; T unchanged
================================  ===========================================================

Block k: ``Q <- CrossAttn(Q, V_k, mask)``, ``(Q, T) <- TextLayer(Q, T)``, ``Q <- SelfAttn(Q)``,
``Q <- FFN(Q)``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.config import configurable
from torch import nn

from ..position_encoding import PositionEmbeddingSine
from .attention_layers import CrossAttentionLayer, FeedForwardLayer, SelfAttentionLayer
from .build import TRANSFORMER_DECODER_REGISTRY
from .category_head import QueryCategoryHead
from .mask_pooling import MaskPooledQueryUpdate
from .mask_positions import MaskPositionEmbedding, RelativeGeometryBias
from .prediction_heads import InstancePredictionHeads, masked_attention_mask
from .relative_location import RelativeLocationScore
from .text_attention import ObjectTextCrossAttention, QueriesReadText
from .text_match import TextMatchScore


class DecoderBlock(nn.Module):
    """One block: visual cross-attention, optional text interaction, self-attention, FFN."""

    def __init__(
        self,
        dim: int,
        nheads: int,
        dim_feedforward: int,
        dropout: float,
        pre_norm: bool,
        text_layer: Optional[nn.Module],
        positions_in_values: bool = False,
        self_attention_positions_in_values: bool = False,
    ):
        super().__init__()
        self.visual_cross_attention = CrossAttentionLayer(
            dim, nheads, dropout=dropout, pre_norm=pre_norm, positions_in_values=positions_in_values
        )
        self.text_interaction = text_layer
        self.self_attention = SelfAttentionLayer(
            dim,
            nheads,
            dropout=dropout,
            pre_norm=pre_norm,
            positions_in_values=self_attention_positions_in_values,
        )
        self.ffn = FeedForwardLayer(dim, dim_feedforward, dropout=dropout, pre_norm=pre_norm)

    def forward(
        self,
        queries: torch.Tensor,
        text: torch.Tensor,
        text_pad_mask: torch.Tensor,
        visual: torch.Tensor,
        visual_pos: torch.Tensor,
        attn_mask: Optional[torch.Tensor],
        query_pos: torch.Tensor,
        self_attention_bias: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        queries = self.visual_cross_attention(
            queries, visual, attn_mask=attn_mask, memory_pos=visual_pos, query_pos=query_pos
        )
        if self.text_interaction is not None:
            queries, text = self.text_interaction(queries, text, text_pad_mask, query_pos)
        queries = self.self_attention(queries, query_pos, self_attention_bias)
        return self.ffn(queries), text


class QueryDecoder(nn.Module):
    """Mask2Former-style multi-scale masked query decoder; subclasses choose ``text_layer_class``."""

    text_layer_class: Optional[type] = None  # None: the decoder ignores the text

    @configurable
    def __init__(
        self,
        *,
        in_channels: int,
        mask_dim: int,
        text_dim: int,
        hidden_dim: int = 256,
        num_queries: int = 100,
        nheads: int = 8,
        dim_feedforward: int = 2048,
        dec_layers: int = 9,
        pre_norm: bool = False,
        enforce_input_proj: bool = False,
        mask_attention: bool = True,
        dropout: float = 0.0,
        num_feature_levels: int = 3,
        positions_in_values: bool = False,
        query_positions_from_masks: bool = False,
        self_attention_positions_in_values: bool = False,
        self_attention_geometry_bias: bool = False,
        geometry_bias_reads_text: bool = False,
        relative_location_score: bool = False,
        text_match_score: bool = False,
        mask_pooled_queries: bool = False,
        category_classes: int = 0,
    ):
        """
        Args:
            in_channels: channels of V1..V3; mask_dim: channels of V4; text_dim: channels of T0.
            hidden_dim: C. num_queries: N. nheads: attention heads. dim_feedforward: FFN width.
            dec_layers: K blocks. pre_norm: pre-norm residual layers instead of post-norm.
            enforce_input_proj: 1x1 conv on V_k even when its channels equal C.
            mask_attention: Mask2Former's masked visual cross-attention (else attend everywhere).
            dropout: dropout of every sub-layer. num_feature_levels: visual levels used in turn.
            positions_in_values: add V_k's sine positions to the values of the visual
                cross-attention, not only to its keys (the paper is silent; Mask2Former adds them
                to the keys only), so that each query's content carries where its object is.
            query_positions_from_masks: before each block, add to each query's learned positional
                embedding an embedding of its current mask's centre and spread (the paper is
                silent; see :mod:`.mask_positions`).
            self_attention_positions_in_values: add the queries' positional embeddings (with
                ``query_positions_from_masks``, where their masks lie) to the values of their
                self-attention, so that a query reads where the others are (the paper is silent;
                Mask2Former adds them to the queries and keys only).
            self_attention_geometry_bias: before each block, a learned bias per head and per
                pair of queries, from where one's current mask lies relative to the other's,
                added to the self-attention logits (the paper is silent; see
                :mod:`.mask_positions`).
            geometry_bias_reads_text: the geometry bias also reads a code of the expression
                (requires ``self_attention_geometry_bias``).
            relative_location_score: add to every relevance logit a term from where the query's
                mask lies among the candidates, weighted by coefficients the expression sets (the
                paper is silent; see :mod:`.relative_location`).
            text_match_score: add to every relevance logit a bilinear match of the query with the
                expression's mean word feature (the paper is silent; see :mod:`.text_match`).
            mask_pooled_queries: before each block, add to each query a linear map of V3 pooled
                over its current mask (the paper is silent; see :mod:`.mask_pooling`).
            category_classes: with a positive value, every prediction also gives each query's
                category logits over this many classes, for an auxiliary loss on the matched
                queries (not in the paper; see :mod:`.category_head`); 0 gives none.
        """
        super().__init__()
        if hidden_dim % 4:
            raise ValueError(
                f"MODEL.INSTALIGN.HIDDEN_DIM={hidden_dim} must be a multiple of 4 (sine positions)."
            )
        self.num_queries = num_queries
        self.nheads = nheads
        self.num_feature_levels = num_feature_levels
        self.mask_attention = mask_attention

        self.position_encoding = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.level_embed = nn.Embedding(num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(num_feature_levels):
            if in_channels != hidden_dim or enforce_input_proj:
                conv = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
                weight_init.c2_xavier_fill(conv)
                self.input_proj.append(conv)
            else:
                self.input_proj.append(nn.Identity())
        self.text_proj = (
            nn.Linear(text_dim, hidden_dim) if text_dim != hidden_dim else nn.Identity()
        )

        self.query_feat = nn.Embedding(num_queries, hidden_dim)  # Q0
        self.query_embed = nn.Embedding(
            num_queries, hidden_dim
        )  # positional embedding of the queries
        self.blocks = nn.ModuleList(
            DecoderBlock(
                hidden_dim,
                nheads,
                dim_feedforward,
                dropout,
                pre_norm,
                (
                    self.text_layer_class(hidden_dim, nheads, dropout=dropout, pre_norm=pre_norm)
                    if self.text_layer_class
                    else None
                ),
                positions_in_values,
                self_attention_positions_in_values,
            )
            for _ in range(dec_layers)
        )
        self.heads = InstancePredictionHeads(hidden_dim, mask_dim)
        self.mask_position_embed = (
            MaskPositionEmbedding(hidden_dim) if query_positions_from_masks else None
        )
        if geometry_bias_reads_text and not self_attention_geometry_bias:
            raise ValueError(
                "MODEL.INSTALIGN.SELF_ATTENTION_GEOMETRY_BIAS_READS_TEXT needs "
                "MODEL.INSTALIGN.SELF_ATTENTION_GEOMETRY_BIAS True: the text conditions that bias."
            )
        self.geometry_bias = (
            RelativeGeometryBias(nheads, text_dim=hidden_dim if geometry_bias_reads_text else 0)
            if self_attention_geometry_bias
            else None
        )
        self.relative_location = (
            RelativeLocationScore(hidden_dim) if relative_location_score else None
        )
        self.text_match = TextMatchScore(hidden_dim, hidden_dim) if text_match_score else None
        self.mask_pooling = (
            MaskPooledQueryUpdate(in_channels, hidden_dim, dec_layers)
            if mask_pooled_queries
            else None
        )
        self.category_head = (
            QueryCategoryHead(hidden_dim, category_classes) if category_classes else None
        )

    @classmethod
    def from_config(cls, cfg, in_channels: int, mask_dim: int, text_dim: int):
        c = cfg.MODEL.INSTALIGN
        return {
            "in_channels": in_channels,
            "mask_dim": mask_dim,
            "text_dim": text_dim,
            "hidden_dim": c.HIDDEN_DIM,
            "num_queries": c.NUM_OBJECT_QUERIES,
            "nheads": c.NHEADS,
            "dim_feedforward": c.DIM_FEEDFORWARD,
            "dec_layers": c.DEC_LAYERS,
            "pre_norm": c.PRE_NORM,
            "enforce_input_proj": c.ENFORCE_INPUT_PROJ,
            "mask_attention": c.MASK_ATTENTION,
            "dropout": c.DROPOUT,
            "positions_in_values": c.POSITIONS_IN_VALUES,
            "query_positions_from_masks": c.QUERY_POSITIONS_FROM_MASKS,
            "self_attention_positions_in_values": c.SELF_ATTENTION_POSITIONS_IN_VALUES,
            "self_attention_geometry_bias": c.SELF_ATTENTION_GEOMETRY_BIAS,
            "geometry_bias_reads_text": c.SELF_ATTENTION_GEOMETRY_BIAS_READS_TEXT,
            "relative_location_score": c.RELATIVE_LOCATION_SCORE,
            "text_match_score": c.TEXT_MATCH_SCORE,
            "mask_pooled_queries": c.MASK_POOLED_QUERIES,
            "category_classes": c.CATEGORY_CLASSES,
        }

    def _visual_tokens(
        self, features: Sequence[torch.Tensor], image_index: Optional[torch.Tensor]
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Size]]:
        """Flatten V1..V3 to ``(E, h*w, C)`` tokens (+ level embedding) and their sine positions,
        projected once per image and then given to each expression of it."""
        if len(features) != self.num_feature_levels:
            raise ValueError(
                f"{type(self).__name__}: expected {self.num_feature_levels} visual levels, got {len(features)}"
            )
        tokens, positions, sizes = [], [], []
        for level, feature in enumerate(features):
            sizes.append(feature.shape[-2:])
            position = self.position_encoding(feature).flatten(2).transpose(1, 2)
            projected = self.input_proj[level](feature).flatten(2).transpose(1, 2)
            projected = projected + self.level_embed.weight[level]
            if image_index is not None:
                position, projected = position[image_index], projected[image_index]
            positions.append(position)
            tokens.append(projected)
        return tokens, positions, sizes

    def _predict(
        self,
        queries: torch.Tensor,
        text: torch.Tensor,
        text_pad_mask: torch.Tensor,
        mask_features: torch.Tensor,
        image_index: Optional[torch.Tensor],
    ) -> Dict[str, torch.Tensor]:
        relevance_logits, mask_logits = self.heads(queries, mask_features, image_index)
        if self.text_match is not None:  # first: the location term weighs candidates by the score
            relevance_logits = self.text_match(relevance_logits, queries, text, text_pad_mask)
        if self.relative_location is not None:
            relevance_logits = self.relative_location(
                relevance_logits, mask_logits, text, text_pad_mask
            )
        prediction = {
            "relevance_logits": relevance_logits,
            "mask_logits": mask_logits,
            "queries": queries,
            "text": text,
        }
        if self.category_head is not None:  # read by the auxiliary loss alone
            prediction["category_logits"] = self.category_head(queries)
        return prediction

    def forward(
        self,
        multi_scale_features: Sequence[torch.Tensor],
        mask_features: torch.Tensor,
        text: torch.Tensor,
        text_pad_mask: torch.Tensor,
        image_index: Optional[torch.Tensor] = None,
    ) -> Dict:
        """
        Args:
            multi_scale_features: [V1, V2, V3], ``(B, in_channels, h_l, w_l)`` at strides 32, 16, 8.
            mask_features: V4, ``(B, mask_dim, H/4, W/4)``.
            text: T0 before projection, ``(B, L, text_dim)``.
            text_pad_mask: ``(B, L)`` bool, True = padding token.
            image_index: None when every expression has its own visual features as above; else
                the visual features are one per image, ``(I, ...)``, and ``image_index (B,)`` names
                each expression's image (the expressions of one image share its features).
        Returns:
            ``{"predictions": [...], "text_pad_mask": (B, L)}``; ``predictions`` holds K + 1 dicts
            (the initial queries, then after each block) with ``relevance_logits (B, N)``,
            ``mask_logits (B, N, H/4, W/4)``, ``queries`` Q_k ``(B, N, C)`` and ``text`` T_k ``(B, L, C)``.
        """
        batch = text.shape[0]
        tokens, positions, sizes = self._visual_tokens(multi_scale_features, image_index)
        text = self.text_proj(text)
        queries = self.query_feat.weight.unsqueeze(0).expand(batch, -1, -1)
        query_pos = self.query_embed.weight.unsqueeze(0).expand(batch, -1, -1)

        predictions = [self._predict(queries, text, text_pad_mask, mask_features, image_index)]
        if self.mask_pooling is not None:  # V3 per expression, indexed once for all K blocks
            finest = multi_scale_features[-1]
            if image_index is not None:
                finest = finest[image_index]
        for k, block in enumerate(self.blocks):
            level = k % self.num_feature_levels
            attn_mask = (
                masked_attention_mask(predictions[-1]["mask_logits"], sizes[level], self.nheads)
                if self.mask_attention
                else None
            )
            masks = predictions[-1]["mask_logits"]
            if self.mask_pooling is not None:  # the finest level, V3, holds the shapes best
                queries = self.mask_pooling(k, queries, finest, masks)
            block_query_pos = query_pos
            if self.mask_position_embed is not None:
                block_query_pos = query_pos + self.mask_position_embed(masks)
            geometry_bias = (
                self.geometry_bias(masks, text, text_pad_mask)
                if self.geometry_bias is not None
                else None
            )
            queries, text = block(
                queries,
                text,
                text_pad_mask,
                tokens[level],
                positions[level],
                attn_mask,
                block_query_pos,
                geometry_bias,
            )
            predictions.append(
                self._predict(queries, text, text_pad_mask, mask_features, image_index)
            )
        return {"predictions": predictions, "text_pad_mask": text_pad_mask}


@TRANSFORMER_DECODER_REGISTRY.register()
class PhraseObjectTransformer(QueryDecoder):
    """POT (paper §3.3): queries and text refine each other through Object-Text Cross Attention."""

    text_layer_class = ObjectTextCrossAttention


@TRANSFORMER_DECODER_REGISTRY.register()
class ReLAStyleDecoder(QueryDecoder):
    """Table 3(e) "ReLA": the queries read the text by cross-attention; the text is not refined."""

    text_layer_class = QueriesReadText


@TRANSFORMER_DECODER_REGISTRY.register()
class Mask2FormerDecoder(QueryDecoder):
    """Table 3(e) "Mask2Former": no text in the decoder (text reaches only the no-target head and POA)."""

    text_layer_class = None
