"""Text-encoder pre-training on the synthetic expressions: our stand-in for RoBERTa's.

The paper's text encoder is a RoBERTa pre-trained on a large corpus by masked language modelling;
without a download the tiny config's small encoder starts from random weights, and every word
(each colour, each shape, "leftmost") must be learned from the GRES losses alone. As the trunk is
first taught what the synthetic objects look like (:mod:`.backbone_pretraining`), this module
first teaches the encoder how the synthetic expressions are built, the way RoBERTa was taught:
masked language modelling (15 % of the words hidden, BERT's 80 / 10 / 10 rule, by transformers'
``DataCollatorForLanguageModeling``) on the training split's sentences. Afterwards words of one
kind (the colours, the shapes, the spatial words) lie close together, and the decoder can attend
to "the colour word" before it knows which colour each one is.

``train_net.py`` calls :func:`ensure_synthetic_pretrained_text_encoder` when
``MODEL.TEXT_ENCODER.SYNTHETIC_PRETRAIN.ITERATIONS > 0``. The result is a transformers directory
(the generator's tokenizer and config, the pre-trained weights) under
``<dataset>/pretrained_text_encoder/``, named by a hash of its settings: made once, then reused,
never rewritten, so runs of several seeds can share the dataset folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from typing import Dict, List, Mapping, Tuple

import torch
from iopath.common.file_io import file_lock
from transformers import AutoConfig, DataCollatorForLanguageModeling, RobertaForMaskedLM

from instalign_d2.synthetic.params import REFS_FILE, read_marker
from instalign_d2.utils.atomic_io import atomic_write_json
from instalign_d2.utils.paths import expand_path
from instalign_d2.utils.tokenizer import load_tokenizer, resolve_text_encoder, tokenize

logger = logging.getLogger(__name__)

STORE_DIR = "pretrained_text_encoder"
SETTINGS_FILE = "pretraining.json"
MASK_PROBABILITY = 0.15  # BERT's and RoBERTa's share of hidden words
WARMUP_ITERATIONS = 50


def split_sentences(dataset_root: str, split: str) -> List[str]:
    """The distinct sentences of one split of the generated ``grefs(unc).json``, sorted."""
    with open(os.path.join(dataset_root, REFS_FILE)) as f:
        refs = json.load(f)
    return sorted({s["sent"] for r in refs if r["split"] == split for s in r["sentences"]})


def pretraining_seed(cfg) -> int:
    """``SYNTHETIC_PRETRAIN.SEED``, or Detectron2's ``SEED`` when that is -1 (0 when both are)."""
    seed = cfg.MODEL.TEXT_ENCODER.SYNTHETIC_PRETRAIN.SEED
    return int(seed if seed >= 0 else max(cfg.SEED, 0))


def pretraining_settings(cfg, dataset_params: Mapping) -> Dict[str, object]:
    """What the pre-trained encoder depends on; other values make another directory."""
    settings = cfg.MODEL.TEXT_ENCODER.SYNTHETIC_PRETRAIN
    return {
        "max_tokens": cfg.MODEL.TEXT_ENCODER.MAX_TOKENS,
        "iterations": settings.ITERATIONS,
        "batch_size": settings.BATCH_SIZE,
        "base_lr": settings.BASE_LR,
        "seed": pretraining_seed(cfg),
        "dataset": dict(dataset_params),
    }


def masked_accuracy(model: RobertaForMaskedLM, inputs, labels, attention_mask) -> float:
    """Share of the hidden tokens that the model names."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=inputs, attention_mask=attention_mask).logits
    model.train(was_training)
    hidden = labels != -100
    return float((logits.argmax(-1)[hidden] == labels[hidden]).float().mean())


def pretrain_text_encoder(
    source: str,
    train_sentences: List[str],
    val_sentences: List[str],
    *,
    iterations: int,
    batch_size: int,
    base_lr: float,
    max_tokens: int,
    seed: int,
) -> Tuple[RobertaForMaskedLM, float]:
    """Masked language modelling of the model that the directory ``source`` describes, from random
    weights; returns it and the share of hidden validation tokens it names."""
    if iterations < 1 or batch_size < 1 or base_lr <= 0:
        raise ValueError(
            "MODEL.TEXT_ENCODER.SYNTHETIC_PRETRAIN: ITERATIONS, BATCH_SIZE and BASE_LR must be "
            f"positive, got {iterations}, {batch_size}, {base_lr}"
        )
    tokenizer = load_tokenizer(source)
    collator = DataCollatorForLanguageModeling(
        tokenizer, mlm=True, mlm_probability=MASK_PROBABILITY, return_tensors="pt", seed=seed
    )
    train = tokenize(tokenizer, train_sentences, max_tokens)
    val = tokenize(tokenizer, val_sentences, max_tokens)
    torch.manual_seed(seed)
    model = RobertaForMaskedLM(AutoConfig.from_pretrained(source, local_files_only=True))
    optimizer = torch.optim.AdamW(model.parameters(), lr=base_lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine decay to 0
        optimizer,
        lambda step: min(1.0, (step + 1) / WARMUP_ITERATIONS)
        * 0.5
        * (1 + math.cos(math.pi * step / iterations)),
    )
    val_inputs, val_labels = collator.torch_mask_tokens(val["input_ids"].clone())
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(iterations):
        rows = torch.randint(0, len(train_sentences), (batch_size,), generator=order)
        inputs, labels = collator.torch_mask_tokens(train["input_ids"][rows].clone())
        loss = model(
            input_ids=inputs, attention_mask=train["attention_mask"][rows], labels=labels
        ).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model, masked_accuracy(model, val_inputs, val_labels, val["attention_mask"])


def store_path(dataset_root: str, settings: Mapping) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(dataset_root, STORE_DIR, f"mlm-{digest}")


def ensure_synthetic_pretrained_text_encoder(cfg, dataset_root: str) -> str:
    """The directory of the text encoder pre-trained with the config's settings, made if absent.

    The tokenizer and config are those of ``MODEL.TEXT_ENCODER.NAME`` (the generator's encoder);
    only the weights are new. Safe to call from several processes: one makes the directory under
    a file lock while the others wait, and it appears whole (written beside, then renamed).
    """
    marker = read_marker(dataset_root)
    if marker is None:
        raise FileNotFoundError(f"text pre-training: no generated dataset in {dataset_root}")
    source = resolve_text_encoder(expand_path(cfg.MODEL.TEXT_ENCODER.NAME))
    wanted = pretraining_settings(cfg, marker["params"])
    path = store_path(dataset_root, wanted)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with file_lock(path + ".lock"):
        if os.path.isfile(os.path.join(path, SETTINGS_FILE)):
            logger.info("text pre-training: %s is up to date", path)
            return path
        settings = cfg.MODEL.TEXT_ENCODER.SYNTHETIC_PRETRAIN
        train_sentences = split_sentences(dataset_root, "train")
        logger.info(
            "text pre-training: masked language modelling of %s from random weights, %d "
            "iterations of %d sentences, on the %d distinct training sentences",
            source,
            settings.ITERATIONS,
            settings.BATCH_SIZE,
            len(train_sentences),
        )
        start = time.perf_counter()
        model, accuracy = pretrain_text_encoder(
            source,
            train_sentences,
            split_sentences(dataset_root, "val"),
            iterations=settings.ITERATIONS,
            batch_size=settings.BATCH_SIZE,
            base_lr=settings.BASE_LR,
            max_tokens=cfg.MODEL.TEXT_ENCODER.MAX_TOKENS,
            seed=pretraining_seed(cfg),
        )
        staging = tempfile.mkdtemp(prefix=".mlm_", dir=os.path.dirname(path))
        try:
            for name in os.listdir(source):  # tokenizer files and config; weights replaced
                if not name.endswith((".safetensors", ".bin")) and os.path.isfile(
                    os.path.join(source, name)
                ):
                    shutil.copy2(os.path.join(source, name), staging)
            model.roberta.save_pretrained(staging)  # the encoder alone, as AutoModel loads it
            atomic_write_json(
                os.path.join(staging, SETTINGS_FILE),
                {"settings": wanted, "val_masked_accuracy": accuracy},
            )
            os.replace(staging, path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        logger.info(
            "text pre-training: wrote %s in %.0f s; it names %.0f %% of the hidden words of the "
            "validation sentences",
            path,
            time.perf_counter() - start,
            100 * accuracy,
        )
    return path
