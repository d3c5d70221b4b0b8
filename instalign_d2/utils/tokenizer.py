"""Load the text encoder's tokenizer from a local directory and tokenise expressions.

The mapper (data side) and the text encoder (model side) share this, so both always agree on
ids, padding and truncation; it lives in ``utils`` so that neither side imports the other.
"""

from __future__ import annotations

import logging
import os
import threading
from functools import lru_cache
from typing import Dict, List, Optional, Sequence

import torch
from huggingface_hub import try_to_load_from_cache
from transformers import AutoTokenizer

from instalign_d2.utils.paths import expand_path

logger = logging.getLogger(__name__)


class TextEncoderNotFoundError(FileNotFoundError):
    """``MODEL.TEXT_ENCODER.NAME`` names nothing that can be loaded without a download."""


def resolve_text_encoder(name: str) -> str:
    """The local directory (or cached hub name) behind ``MODEL.TEXT_ENCODER.NAME``.

    Never downloads: a name that is neither a directory nor in the local Hugging Face cache
    raises :class:`TextEncoderNotFoundError` with the fix.
    """
    path = expand_path(name)
    if os.path.isdir(path):
        return path
    try:  # a hub name already in the local cache is fine; nothing is fetched

        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return name
    except Exception:  # pragma: no cover - depends on the local cache
        pass
    raise TextEncoderNotFoundError(
        f"MODEL.TEXT_ENCODER.NAME={name!r}: no such directory ({os.path.abspath(path)}) and not in the "
        "local Hugging Face cache. Point it to a local transformers directory (e.g. a copy of "
        "roberta-base with config.json, vocab.json, merges.txt and the weights)."
    )


@lru_cache(maxsize=8)
def load_tokenizer(name: str):
    """``AutoTokenizer`` of the text encoder, loaded from local files only (cached per name)."""

    return AutoTokenizer.from_pretrained(resolve_text_encoder(name), local_files_only=True)


def tokenize(tokenizer, sentences: Sequence[str], max_tokens: int) -> Dict[str, torch.Tensor]:
    """Token ids and attention mask (1 = real token) of ``sentences``, padded to ``max_tokens``.

    Pads with the tokenizer's own pad id (RoBERTa: 1, not 0) and warns once per call when a
    sentence is truncated.
    """
    sentences: List[str] = [str(s) for s in sentences]
    encoded = tokenizer(
        sentences,
        padding="max_length",
        truncation=True,
        max_length=max_tokens,
        return_tensors="pt",
        return_overflowing_tokens=False,
    )
    # Only a sentence that fills all max_tokens positions may have been cut: encode those again.
    full = encoded["attention_mask"].sum(dim=1) >= max_tokens
    too_long = [
        s
        for s, f in zip(sentences, full.tolist())
        if f and len(tokenizer(s)["input_ids"]) > max_tokens
    ]
    if too_long:
        logger.warning(
            "%d expression(s) longer than MAX_TOKENS=%d were truncated, e.g. %r",
            len(too_long),
            max_tokens,
            too_long[0][:80],
        )
    return {
        "input_ids": encoded["input_ids"].long(),
        "attention_mask": encoded["attention_mask"].long(),
    }


class ThreadSafeTokenizer:
    """A tokenizer that several threads may call at once (e.g. the requests of the demo page).

    A fast (Rust) tokenizer keeps its truncation and padding settings as state that every call
    sets before encoding: two threads that tokenise at once with different settings get each
    other's (unpadded ids where padding was asked, a batch that cannot become a tensor) or
    "Already borrowed". Calls through this wrapper take turns; everything else is the wrapped
    tokenizer's.
    """

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._lock = threading.Lock()

    def __call__(self, *args, **kwargs):
        with self._lock:
            return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def is_text_encoder_dir(directory: Optional[str]) -> bool:
    """True when ``directory`` holds a tokenizer and a model config that transformers can load."""
    if not directory or not os.path.isdir(directory):
        return False
    names = set(os.listdir(directory))
    has_tokenizer = {"vocab.json", "merges.txt"} <= names or "tokenizer.json" in names
    return has_tokenizer and "config.json" in names
