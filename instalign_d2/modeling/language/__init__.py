"""Text encoder (transformers AutoModel); its tokenizer helpers live in ``instalign_d2.utils.tokenizer``."""

from .text_encoder import TextEncoder, build_text_encoder

__all__ = ["TextEncoder", "build_text_encoder"]
