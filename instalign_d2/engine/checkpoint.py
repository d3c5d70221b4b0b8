"""A DetectionCheckpointer whose files are never half-written, and that knows its tokenizer.

fvcore writes ``model_XXXX.pth`` and then ``last_checkpoint`` in place: a kill during either
write can leave ``last_checkpoint`` naming a truncated file, and ``--resume`` then fails. Here
both are written to a temporary file in the same folder and renamed, which is atomic on POSIX.

The trained token embeddings live in the checkpoint, but the tokenizer that numbers the tokens
lives in ``MODEL.TEXT_ENCODER.NAME`` (for the synthetic set it is learned from the generated
corpus, so another dataset seed gives other ids). A checkpoint therefore records a fingerprint of
its tokenizer's vocabulary, and loading it into a model with another tokenizer stops with one
line instead of giving answers about other words.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer

from instalign_d2.engine.checks import ConfigError
from instalign_d2.engine.ddp import unwrap_model
from instalign_d2.utils.atomic_io import atomic_write

TOKENIZER_KEY = "tokenizer_fingerprint"


class TokenizerMismatchError(ConfigError):
    """A checkpoint was trained with another tokenizer than the model's."""


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what maps text to ids: the vocabulary (and BPE merges) of ``tokenizer``.

    Only the tokenizer model is hashed, not its truncation or padding state, which tokenising
    changes on the fly.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        content = json.loads(backend.to_str())["model"]
    else:  # a slow tokenizer: its vocabulary is all there is to compare
        content = sorted(tokenizer.get_vocab().items())
    text = json.dumps(content, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def model_tokenizer(model) -> Optional[object]:
    """The tokenizer of a (possibly DDP-wrapped) InstAlign, or None for other models."""
    model = unwrap_model(model)
    return getattr(getattr(model, "text_encoder", None), "tokenizer", None)


class AtomicCheckpointer(DetectionCheckpointer):
    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        tokenizer = model_tokenizer(self.model)
        if tokenizer is not None:
            data[TOKENIZER_KEY] = tokenizer_fingerprint(tokenizer)
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        path = os.path.join(self.save_dir, "last_checkpoint")
        atomic_write(path, lambda f: f.write(last_filename_basename.encode()))

    def _load_model(self, checkpoint):
        self._check_tokenizer(checkpoint)
        return super()._load_model(checkpoint)

    def _check_tokenizer(self, checkpoint) -> None:
        saved = checkpoint.pop(TOKENIZER_KEY, None)
        tokenizer = model_tokenizer(self.model)
        if saved is None or tokenizer is None:
            return  # a checkpoint from elsewhere (e.g. ReLA-style weights) records none
        current = tokenizer_fingerprint(tokenizer)
        if saved != current:
            raise TokenizerMismatchError(
                f"the checkpoint was trained with another tokenizer than the text encoder's "
                f"(MODEL.TEXT_ENCODER.NAME={getattr(tokenizer, 'name_or_path', '?')}; vocabulary "
                f"fingerprint {current}, the checkpoint's {saved}): its token ids would mean other "
                "words. Point MODEL.TEXT_ENCODER.NAME at the text encoder the model was trained "
                "with (for the synthetic set: the dataset generated with the same "
                "DATASETS.SYNTHETIC.* settings)."
            )
