"""Registry of the query decoders and the builder that ``MODEL.INSTALIGN.DECODER`` selects from."""

from detectron2.utils.registry import Registry

TRANSFORMER_DECODER_REGISTRY = Registry("INSTALIGN_TRANSFORMER_DECODER")
TRANSFORMER_DECODER_REGISTRY.__doc__ = """
Query decoders of InstAlign. A registered class is built as ``cls(cfg, in_channels, mask_dim, text_dim)``
and returns per-block predictions (see ``QueryDecoder.forward``).
"""

# The config's short names (Table 3(e)) -> registered class names. Other registered names work as is.
DECODER_ALIASES = {
    "POT": "PhraseObjectTransformer",
    "M2F": "Mask2FormerDecoder",
    "RELA": "ReLAStyleDecoder",
}


def build_transformer_decoder(cfg, in_channels: int, mask_dim: int, text_dim: int):
    """The decoder named by ``MODEL.INSTALIGN.DECODER`` ("POT", "M2F", "RELA" or a registered class name).

    Args:
        in_channels: channels of the pixel decoder's multi-scale features V1..V3.
        mask_dim: channels of the mask features V4.
        text_dim: channels of the text encoder's word features.
    """
    name = cfg.MODEL.INSTALIGN.DECODER
    class_name = DECODER_ALIASES.get(name, name)
    if class_name not in TRANSFORMER_DECODER_REGISTRY:
        choices = sorted(set(DECODER_ALIASES) | {n for n, _ in TRANSFORMER_DECODER_REGISTRY})
        raise KeyError(
            f"MODEL.INSTALIGN.DECODER={name!r} is not a known decoder; choose one of {choices}."
        )
    return TRANSFORMER_DECODER_REGISTRY.get(class_name)(cfg, in_channels, mask_dim, text_dim)
