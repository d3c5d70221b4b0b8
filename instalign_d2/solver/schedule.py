"""The training schedule in epochs (paper §4.1: 20 epochs) instead of iterations.

Detectron2 counts iterations: its training sampler is infinite, and each iteration takes
``SOLVER.IMS_PER_BATCH`` samples over all workers. With ``SOLVER.EPOCHS > 0``,
:func:`apply_epoch_schedule` computes ``MAX_ITER`` from the size of the registered train split,
so the schedule follows the split the user actually has (gRefCOCO's ~210k expressions, Ref-ZOM's
count in DMMI's split, ...) instead of a number of iterations written for one of them. A sample is
what the train loader draws (``instalign_d2.data.build.build_gres_train_loader``): one expression,
or with ``DATALOADER.TRAIN_EXPRESSIONS_PER_IMAGE > 0`` one image with up to that many of its
expressions. Checkpoint and evaluation periods may be given in epochs too; warm-up stays in
iterations (``SOLVER.WARMUP_ITERS``).
"""

from __future__ import annotations

import logging
import math
from typing import Tuple

from detectron2.config import CfgNode

from instalign_d2.data.build import group_by_image
from instalign_d2.data.checked import checked_dicts
from instalign_d2.engine.checks import ConfigError

logger = logging.getLogger(__name__)


def iterations_for_epochs(num_samples: int, batch: int, epochs: int) -> int:
    """Iterations for ``epochs`` passes over ``num_samples`` samples at ``batch`` samples per
    iteration: ``ceil(epochs * num_samples / batch)`` (the last pass is completed, not cut)."""
    if num_samples <= 0 or batch <= 0 or epochs < 0:
        raise ValueError(
            f"iterations_for_epochs: need num_samples > 0, batch > 0 and epochs >= 0, got "
            f"{num_samples}, {batch} and {epochs}"
        )
    return math.ceil(epochs * num_samples / batch)


def count_train_samples(cfg: CfgNode) -> Tuple[int, int]:
    """``(samples, expressions)`` of ``DATASETS.TRAIN``, counted as the train loader builds them."""

    # What the train loader will read (expressions of missing images left out); ``keep`` leaves
    # the loaded split for the loader, so it is read once.
    dataset = [
        record
        for name in cfg.DATASETS.TRAIN
        for record in checked_dicts(cfg, name, training=True, keep=True)
    ]
    if cfg.DATALOADER.TRAIN_EXPRESSIONS_PER_IMAGE > 0:
        return len(group_by_image(dataset)), len(dataset)
    return len(dataset), len(dataset)


def apply_epoch_schedule(cfg: CfgNode) -> CfgNode:
    """A copy of ``cfg`` whose iteration keys follow its epoch keys.

    ``SOLVER.EPOCHS``, ``SOLVER.CHECKPOINT_PERIOD_EPOCHS`` and ``TEST.EVAL_PERIOD_EPOCHS`` (each
    0 = keep the iteration key) set ``SOLVER.MAX_ITER``, ``SOLVER.CHECKPOINT_PERIOD`` and
    ``TEST.EVAL_PERIOD`` from the number of training samples and ``SOLVER.IMS_PER_BATCH``, and the
    result is logged in one line. Without epoch keys, ``cfg`` itself is returned and no dataset
    is read. The copy is frozen when ``cfg`` is.
    """
    # (section, iteration key) -> (its epoch key, value)
    keys = {
        ("SOLVER", "MAX_ITER"): ("SOLVER.EPOCHS", cfg.SOLVER.EPOCHS),
        ("SOLVER", "CHECKPOINT_PERIOD"): (
            "SOLVER.CHECKPOINT_PERIOD_EPOCHS",
            cfg.SOLVER.CHECKPOINT_PERIOD_EPOCHS,
        ),
        ("TEST", "EVAL_PERIOD"): ("TEST.EVAL_PERIOD_EPOCHS", cfg.TEST.EVAL_PERIOD_EPOCHS),
    }
    for name, epochs in keys.values():
        if epochs < 0:
            raise ConfigError(f"{name}={epochs}: expected a number of epochs >= 0 (0 = off)")
    if not any(epochs for _, epochs in keys.values()):
        return cfg

    samples, expressions = count_train_samples(cfg)
    batch = cfg.SOLVER.IMS_PER_BATCH
    if samples == 0:
        raise ConfigError(
            f"SOLVER.EPOCHS and *_EPOCHS need training samples, but DATASETS.TRAIN "
            f"{tuple(cfg.DATASETS.TRAIN)} has none"
        )
    if batch <= 0:
        raise ConfigError(f"SOLVER.IMS_PER_BATCH={batch}: expected > 0")

    out = cfg.clone()
    out.defrost()
    for (section, key), (_, epochs) in keys.items():
        if epochs > 0:
            out[section][key] = iterations_for_epochs(samples, batch, epochs)
    if cfg.is_frozen():
        out.freeze()

    per_image = cfg.DATALOADER.TRAIN_EXPRESSIONS_PER_IMAGE
    unit = f"images with up to {per_image} expressions" if per_image > 0 else "expressions"
    logger.info(
        "Schedule in epochs: %s training %s (%s expressions) at %d per batch: "
        "%s epochs = %s iterations; checkpoint every %s, evaluation every %s iterations",
        f"{samples:,}",
        unit,
        f"{expressions:,}",
        batch,
        cfg.SOLVER.EPOCHS or "(MAX_ITER)",
        f"{out.SOLVER.MAX_ITER:,}",
        f"{out.SOLVER.CHECKPOINT_PERIOD:,}",
        f"{out.TEST.EVAL_PERIOD:,}",
    )
    return out
