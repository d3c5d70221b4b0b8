"""Write a small RoBERTa-style text encoder directory from a corpus, without any download.

The synthetic dataset and the tests use it: a byte-level BPE tokenizer trained offline with the
``tokenizers`` library plus a small ``RobertaConfig``, saved as a transformers directory that
``AutoTokenizer.from_pretrained(dir)`` / ``AutoModel.from_config(...)`` load and that
``MODEL.TEXT_ENCODER.NAME`` can point to.

Why not ``RobertaTokenizer(vocab_file=..., merges_file=...)``: in transformers 5 that silently
builds a 5-token tokenizer mapping every word to ``<unk>``; loading the saved directory through
``AutoTokenizer`` gives the real ids and RoBERTa's pad id 1.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Iterable

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import AutoModel, RobertaConfig

# RoBERTa's special tokens, in the order that gives its ids: <s>=0, <pad>=1, </s>=2, <unk>=3.
ROBERTA_SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def write_local_text_encoder(
    directory: str,
    corpus: Iterable[str],
    *,
    vocab_size: int = 1000,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 256,
    max_tokens: int = 20,
    dropout: float = 0.1,
    save_weights: bool = False,
    seed: int = 0,
) -> str:
    """Train a byte-level BPE tokenizer on ``corpus`` and write it with a small RobertaConfig.

    Args:
        directory: where the transformers directory goes (replaced atomically if it exists).
        corpus: sentences the tokenizer is trained on.
        vocab_size: upper bound of the BPE vocabulary (special tokens included).
        hidden_size, num_layers, num_heads, intermediate_size: size of the RoBERTa model.
        max_tokens: longest tokenised expression the model must accept (position table size).
        dropout: hidden and attention dropout (RoBERTa's 0.1; a model trained from scratch on a
            small synthetic task learns faster without).
        save_weights: also save randomly initialised weights (seeded), so that
            ``MODEL.TEXT_ENCODER.PRETRAINED: True`` loads reproducible weights.
        seed: seed of those weights.
    Returns:
        ``directory``.
    """

    sentences = [s for s in corpus if s]
    if not sentences:
        raise ValueError(
            "write_local_text_encoder: the corpus is empty; give it the dataset's sentences."
        )
    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(
        sentences,
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=ROBERTA_SPECIAL_TOKENS,
        show_progress=False,
    )
    config = RobertaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        # RoBERTa numbers positions from pad_id + 1 = 2, so it needs max_tokens + 2 entries.
        max_position_embeddings=max_tokens + 2,
        type_vocab_size=1,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )

    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".text_encoder_", dir=parent)
    try:
        tokenizer.save_model(staging)
        config.save_pretrained(staging)
        if save_weights:

            torch.manual_seed(seed)
            AutoModel.from_config(config).save_pretrained(staging)
        if os.path.exists(directory):
            shutil.rmtree(directory)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory
