"""The text encoder: transformers ``AutoModel`` word features projected to the model's width.

Paper §3.2: RoBERTa embeds the expression into word features ``T0 in R^{L x C}``. The
transformer comes from a local directory (``MODEL.TEXT_ENCODER.NAME``) -- never a download --
and a linear layer maps its hidden size to the decoder's C.
"""

from __future__ import annotations

import logging
from typing import Dict, Sequence, Tuple

import torch
from detectron2.config import configurable
from torch import nn
from transformers import AutoConfig, AutoModel

from instalign_d2.utils.tokenizer import load_tokenizer, resolve_text_encoder, tokenize

__all__ = ["TextEncoder", "build_text_encoder"]

logger = logging.getLogger(__name__)

# RoBERTa-style models number positions from pad_token_id + 1, so they fit fewer tokens than
# max_position_embeddings.
_POSITIONS_AFTER_PAD = ("roberta", "xlm-roberta", "camembert", "longformer")


def _longest_sequence(config) -> int:
    """Most tokens one sequence may have for this transformer config (a large number if unknown)."""
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        return 1 << 30
    if getattr(config, "model_type", "") in _POSITIONS_AFTER_PAD:
        limit -= (getattr(config, "pad_token_id", 1) or 0) + 1
    return limit


class TextEncoder(nn.Module):
    """Word features ``(B, L, out_dim)`` and a padding mask ``(B, L)`` (True = padding).

    Args:
        name: local transformers directory (or a name already in the Hugging Face cache).
        out_dim: width of the projected features (the decoder's hidden dim C).
        max_tokens: tokens per expression, <s> and </s> included.
        pretrained: load the directory's weights; False builds the model from its config with
            random weights (the synthetic setting and the tests).
        freeze: keep the transformer's weights fixed (the projection still trains).
    """

    @configurable
    def __init__(
        self,
        *,
        name: str,
        out_dim: int,
        max_tokens: int = 20,
        pretrained: bool = True,
        freeze: bool = False,
    ):
        super().__init__()

        if max_tokens < 3:
            raise ValueError(
                f"TextEncoder: MODEL.TEXT_ENCODER.MAX_TOKENS={max_tokens} leaves no room for words next to <s> and </s>"
            )
        path = resolve_text_encoder(name)
        self.name = name
        self.max_tokens = int(max_tokens)
        self.out_dim = int(out_dim)
        self.freeze = freeze
        self.tokenizer = load_tokenizer(name)

        config = AutoConfig.from_pretrained(path, local_files_only=True)
        longest = _longest_sequence(config)
        if self.max_tokens > longest:
            raise ValueError(
                f"TextEncoder: MODEL.TEXT_ENCODER.MAX_TOKENS={max_tokens} but {name!r} takes at most {longest} tokens "
                f"(max_position_embeddings={config.max_position_embeddings}); lower MAX_TOKENS"
            )
        if pretrained:
            self.transformer = AutoModel.from_pretrained(path, local_files_only=True)
        else:
            self.transformer = AutoModel.from_config(config)
            logger.info(
                "TextEncoder: %s built from its config with random weights (PRETRAINED: False)",
                name,
            )
        # The sentence pooler is never used; left in, its weights get no gradient, which
        # DistributedDataParallel rejects unless it searches for unused parameters every step.
        if getattr(self.transformer, "pooler", None) is not None:
            self.transformer.pooler = None
        self.projection = nn.Linear(self.transformer.config.hidden_size, self.out_dim)

        if freeze:
            for parameter in self.transformer.parameters():
                parameter.requires_grad_(False)
            self.transformer.eval()

    @classmethod
    def from_config(cls, cfg):
        text = cfg.MODEL.TEXT_ENCODER
        return {
            "name": text.NAME,
            "out_dim": cfg.MODEL.INSTALIGN.HIDDEN_DIM,
            "max_tokens": text.MAX_TOKENS,
            "pretrained": text.PRETRAINED,
            "freeze": text.FREEZE,
        }

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze:
            self.transformer.eval()  # a frozen encoder also keeps its dropout off
        return self

    def tokenize(self, sentences: Sequence[str]) -> Dict[str, torch.Tensor]:
        """``{"input_ids", "attention_mask"}``, both int64 (len(sentences), max_tokens), padded
        with the tokenizer's pad id -- the same function the dataset mapper uses."""
        if isinstance(sentences, str):
            raise TypeError("TextEncoder.tokenize: pass a list of sentences, not one string")
        return tokenize(self.tokenizer, sentences, self.max_tokens)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``input_ids`` (B, L) int64 and ``attention_mask`` (B, L), 1 = real token ->
        ``(features (B, L, out_dim), pad_mask (B, L) bool, True = padding)``."""
        if input_ids.dim() != 2 or tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"TextEncoder: input_ids and attention_mask must both be (B, L), got {tuple(input_ids.shape)} "
                f"and {tuple(attention_mask.shape)}"
            )
        if input_ids.is_floating_point():
            raise TypeError(
                f"TextEncoder: input_ids must be integer token ids, got {input_ids.dtype}"
            )
        mask = attention_mask.long()
        if self.freeze:
            with torch.no_grad():  # no activations kept for a backward that never reaches it
                hidden = self.transformer(
                    input_ids=input_ids.long(), attention_mask=mask
                ).last_hidden_state
        else:
            hidden = self.transformer(
                input_ids=input_ids.long(), attention_mask=mask
            ).last_hidden_state
        return self.projection(hidden), mask == 0


def build_text_encoder(cfg) -> TextEncoder:
    """The text encoder of ``cfg.MODEL.TEXT_ENCODER``."""
    return TextEncoder(cfg)
