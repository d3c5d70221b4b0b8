"""Data loaders for GRES training and evaluation.

Evaluation groups the expressions of each image into one batch (gRefCOCO has about 14 per
image), so that the model runs its backbone and pixel decoder once per image and only the text
encoder and decoder once per expression (``InstAlign.inference`` groups a batch by image).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
from detectron2.data import DatasetCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.data import get_detection_dataset_dicts

from .dataset_mapper import GRESDatasetMapper

__all__ = ["group_by_image", "ExpressionGroupMapper", "build_gres_train_loader", "build_gres_test_loader"]


def group_by_image(dataset_dicts: Sequence[Dict]) -> List[List[Dict]]:
    """The dataset's expressions as one list per image (``file_name``), in first-seen order."""
    groups: "OrderedDict[str, List[Dict]]" = OrderedDict()
    for record in dataset_dicts:
        groups.setdefault(record["file_name"], []).append(record)
    return list(groups.values())


class ExpressionGroupMapper:
    """Maps the expressions of one image with a per-expression mapper, reading the image once."""

    def __init__(self, mapper: Callable[[Dict], Optional[Dict]]):
        self.mapper = mapper

    def __call__(self, group: Sequence[Dict]) -> List[Dict]:
        mapped = [self.mapper(record) for record in group]
        mapped = [m for m in mapped if m is not None]
        # The expressions of one image get one image tensor, so the model sees them as one image
        # without comparing pixels (the resize is deterministic at test time).
        first = next((m for m in mapped if "skipped_reason" not in m), None)
        if first is not None:
            for m in mapped:
                if "skipped_reason" not in m and m["image"].shape == first["image"].shape:
                    m["image"] = first["image"]
        return mapped


def _identity_collate(batch: List[List[Dict]]) -> List[Dict]:
    return [record for group in batch for record in group]


def build_gres_train_loader(cfg, mapper=None):
    """Detectron2's train loader over ``DATASETS.TRAIN``, keeping no-target expressions (which
    have no annotations and would be dropped by ``FILTER_EMPTY_ANNOTATIONS``)."""
    dataset = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=False)
    return build_detection_train_loader(cfg, dataset=dataset, mapper=mapper or GRESDatasetMapper(cfg, is_train=True))


def build_gres_test_loader(cfg, dataset_name: str, mapper=None, group_expressions: Optional[bool] = None):
    """Test loader of one dataset; with ``DATALOADER.GROUP_EXPRESSIONS_BY_IMAGE`` each batch holds
    all expressions of one image, else one expression."""
    mapper = mapper or GRESDatasetMapper(cfg, is_train=False)
    if group_expressions is None:
        group_expressions = cfg.DATALOADER.GROUP_EXPRESSIONS_BY_IMAGE
    if not group_expressions:
        return build_detection_test_loader(cfg, dataset_name, mapper=mapper)
    groups = group_by_image(DatasetCatalog.get(dataset_name))
    sizes = np.array([len(g) for g in groups])
    import logging

    logging.getLogger(__name__).info(
        "Evaluating %s: %d expressions of %d images (%.1f per image), one batch per image",
        dataset_name, sizes.sum(), len(groups), sizes.mean() if len(sizes) else 0.0,
    )
    return build_detection_test_loader(
        dataset=groups,
        mapper=ExpressionGroupMapper(mapper),
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        collate_fn=_identity_collate,
    )
