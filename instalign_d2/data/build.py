"""Data loaders for GRES training and evaluation.

Evaluation groups the expressions of each image into one batch (gRefCOCO has about 14 per
image), so that the model runs its backbone and pixel decoder once per image and only the text
encoder and decoder once per expression (``InstAlign.inference`` groups a batch by image).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
from detectron2.data import build_detection_test_loader, build_detection_train_loader

from .checked import checked_dicts, max_missing_image_fraction, with_key
from .dataset_mapper import GRESDatasetMapper
from .datasets.errors import DatasetLayoutError
from .unreadable import UnreadableImageGuard

__all__ = [
    "group_by_image",
    "ExpressionGroupMapper",
    "build_gres_train_loader",
    "build_gres_test_loader",
]


def group_by_image(dataset_dicts: Sequence[Dict]) -> List[List[Dict]]:
    """The dataset's expressions as one list per image (``file_name``), in first-seen order."""
    groups: "OrderedDict[str, List[Dict]]" = OrderedDict()
    for record in dataset_dicts:
        groups.setdefault(record["file_name"], []).append(record)
    return list(groups.values())


class ExpressionGroupMapper:
    """Maps the expressions of one image with a per-expression mapper.

    Args:
        mapper: the per-expression mapper (``GRESDatasetMapper``).
        max_expressions: training: map a random subset of at most this many (None: all).
    """

    def __init__(
        self, mapper: Callable[[Dict], Optional[Dict]], max_expressions: Optional[int] = None
    ):
        self.mapper = mapper
        self.max_expressions = max_expressions

    def __call__(self, group: Sequence[Dict]) -> Optional[List[Dict]]:
        if self.max_expressions is not None and len(group) > self.max_expressions:
            chosen = np.random.choice(len(group), self.max_expressions, replace=False)
            group = [group[i] for i in sorted(chosen)]
        mapped = [self.mapper(record) for record in group]
        mapped = [m for m in mapped if m is not None]
        if not mapped:
            return None  # training: Detectron2's MapDataset draws another image
        # Expressions whose images came out identical get one tensor, so the model sees them as one
        # image without comparing pixels (always so at test time and when training without
        # augmentation; random crops make each expression's image its own).
        first = next((m for m in mapped if "skipped_reason" not in m), None)
        if first is not None:
            for m in mapped:
                if (
                    "skipped_reason" not in m
                    and m["image"] is not first["image"]
                    # numpy's comparison: torch.equal is ~50x slower on a uint8 image on the CPU
                    and np.array_equal(m["image"].numpy(), first["image"].numpy())
                ):
                    m["image"] = first["image"]
        return mapped


def _flatten_collate(batch: List[List[Dict]]) -> List[Dict]:
    return [record for group in batch for record in group]


def _checked(cfg, key: str, name: str, training: bool) -> List[Dict]:
    try:
        return checked_dicts(cfg, name, training=training)
    except DatasetLayoutError as exc:
        raise with_key(key, name, exc) from None


def build_gres_train_loader(cfg, mapper=None):
    """Detectron2's train loader over ``DATASETS.TRAIN``, keeping no-target expressions (which
    have no annotations and would be dropped by ``FILTER_EMPTY_ANNOTATIONS``).

    The splits are checked first (``instalign_d2/data/checked.py``): the expressions of missing
    images are left out, and an unusable split stops with a one-line
    :class:`~instalign_d2.data.datasets.errors.DatasetError`. Images that cannot be decoded are
    skipped and counted; too many stop the run (:class:`UnreadableImageGuard`).

    With ``DATALOADER.TRAIN_EXPRESSIONS_PER_IMAGE = k > 0`` a sample is an image with up to k of
    its expressions (``IMS_PER_BATCH`` images per batch), so one backbone pass serves k
    expressions; else a sample is one expression, as in the paper.
    """
    dataset = [
        d for name in cfg.DATASETS.TRAIN for d in _checked(cfg, "DATASETS.TRAIN", name, True)
    ]
    mapper = UnreadableImageGuard(
        mapper or GRESDatasetMapper(cfg, is_train=True),
        num_images=len({d["file_name"] for d in dataset}),
        max_fraction=max_missing_image_fraction(cfg),
    )
    per_image = cfg.DATALOADER.TRAIN_EXPRESSIONS_PER_IMAGE
    if per_image > 0:
        groups = group_by_image(dataset)
        logging.getLogger(__name__).info(
            "Training samples: %d images with up to %d of their expressions each (%d expressions)",
            len(groups),
            per_image,
            len(dataset),
        )
        return build_detection_train_loader(
            cfg,
            dataset=groups,
            mapper=ExpressionGroupMapper(mapper, per_image),
            aspect_ratio_grouping=False,
            collate_fn=_flatten_collate,
        )
    # Every input is resized to IMAGE_SIZE^2, so grouping by aspect ratio would buy nothing.
    return build_detection_train_loader(
        cfg, dataset=dataset, mapper=mapper, aspect_ratio_grouping=False
    )


def build_gres_test_loader(
    cfg, dataset_name: str, mapper=None, group_expressions: Optional[bool] = None
):
    """Test loader of one dataset; with ``DATALOADER.GROUP_EXPRESSIONS_BY_IMAGE`` each batch holds
    all expressions of one image, else one expression. The split is checked first; the
    expressions of missing images stay, and the evaluator counts them as skipped."""
    mapper = mapper or GRESDatasetMapper(cfg, is_train=False)
    if group_expressions is None:
        group_expressions = cfg.DATALOADER.GROUP_EXPRESSIONS_BY_IMAGE
    dataset = _checked(cfg, "DATASETS.TEST", dataset_name, False)
    if not group_expressions:
        return build_detection_test_loader(
            dataset=dataset, mapper=mapper, num_workers=cfg.DATALOADER.NUM_WORKERS
        )
    groups = group_by_image(dataset)
    sizes = np.array([len(g) for g in groups])
    logging.getLogger(__name__).info(
        "Evaluating %s: %d expressions of %d images (%.1f per image), one batch per image",
        dataset_name,
        sizes.sum(),
        len(groups),
        sizes.mean() if len(sizes) else 0.0,
    )
    return build_detection_test_loader(
        dataset=groups,
        mapper=ExpressionGroupMapper(mapper),
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        collate_fn=_flatten_collate,
    )
