"""Query decoders of InstAlign: the Phrase-Object Transformer and the Table 3(e) ablation decoders."""

from .build import DECODER_ALIASES, TRANSFORMER_DECODER_REGISTRY, build_transformer_decoder
from .query_decoder import (
    Mask2FormerDecoder,
    PhraseObjectTransformer,
    QueryDecoder,
    ReLAStyleDecoder,
)

__all__ = [
    "DECODER_ALIASES",
    "TRANSFORMER_DECODER_REGISTRY",
    "build_transformer_decoder",
    "QueryDecoder",
    "PhraseObjectTransformer",
    "ReLAStyleDecoder",
    "Mask2FormerDecoder",
]
