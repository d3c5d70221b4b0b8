"""InstAlign's modules. Importing this registers the backbone, pixel decoder and query decoders."""

from . import backbone, pixel_decoder, transformer_decoder  # noqa: F401  (registrations)
from .aggregation import InstanceAggregation, NoTargetHead, aggregate_instances
from .criterion import InstAlignCriterion, phrase_alignment_loss, phrase_token_weights
from .matcher import PhraseAwareHungarianMatcher

__all__ = [
    "InstAlignCriterion",
    "InstanceAggregation",
    "NoTargetHead",
    "PhraseAwareHungarianMatcher",
    "aggregate_instances",
    "phrase_alignment_loss",
    "phrase_token_weights",
]
