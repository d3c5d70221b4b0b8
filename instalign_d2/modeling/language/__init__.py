"""Text encoder (transformers AutoModel) and its tokenizer."""

from .local_encoder import is_text_encoder_dir, write_local_text_encoder
from .text_encoder import TextEncoder, build_text_encoder
from .tokenizer import TextEncoderNotFoundError, load_tokenizer, resolve_text_encoder, tokenize

__all__ = [
    "TextEncoder",
    "TextEncoderNotFoundError",
    "build_text_encoder",
    "is_text_encoder_dir",
    "load_tokenizer",
    "resolve_text_encoder",
    "tokenize",
    "write_local_text_encoder",
]
