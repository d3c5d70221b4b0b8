"""gRefCOCO (Liu et al., CVPR 2023) in its published layout, and any dataset written in it.

A ref: ``ref_id, image_id, split, ann_id`` (an int or a list; ``[-1]`` means no target),
``category_id``, ``sentences`` (``{sent_id, sent, raw, tokens}``) and usually ``no_target``.
Our synthetic dataset is written in this layout and loads through :func:`load_grefcoco_json`.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Mapping, Optional

from instalign_d2.data.datasets.catalog import register_splits
from instalign_d2.data.datasets.image_presence import ImageFolders
from instalign_d2.data.datasets.refer_common import (
    as_id_list,
    first_existing,
    kind_of_target_count,
    load_expression_dicts,
    require_path,
)

GREFCOCO_SPLITS = ("train", "val", "testA", "testB")
NO_TARGET_ANN_ID = -1

GREFCOCO_LAYOUT = """\
  grefcoco/
    grefs(unc).json        (or the pickle grefs(unc).p)
    instances.json
  images/
    train2014/             COCO train2014 images (COCO_train2014_*.jpg)"""


def grefcoco_paths(datasets_root: str) -> Dict[str, str]:
    """Where gRefCOCO's files are expected under ``datasets_root`` (nothing is checked here)."""
    folder = os.path.join(datasets_root, "grefcoco")
    json_refs = os.path.join(folder, "grefs(unc).json")
    refs_file = first_existing([json_refs, os.path.join(folder, "grefs(unc).p")]) or json_refs
    return {
        "dataset_root": folder,
        "refs_file": refs_file,
        "instances_file": os.path.join(folder, "instances.json"),
        "image_root": os.path.join(datasets_root, "images", "train2014"),
    }


def grefcoco_target_ids(ref: Mapping) -> List[int]:
    """The ref's target annotation ids; ``[-1]`` (or ``no_target``) means none."""
    # The ids decide, not the ``no_target`` flag: some refs lack the flag, and the ids are what
    # the masks come from.
    return [i for i in as_id_list(ref.get("ann_id")) if i != NO_TARGET_ANN_ID]


def grefcoco_describer(source: str):
    """The per-ref fields of a gRefCOCO-style dict: empty, kind by target count, ``source``."""

    def describe(ref: Mapping, targets: List[dict]) -> Dict[str, object]:
        return {
            "empty": not targets,
            "expression_kind": kind_of_target_count(len(targets)),
            "source": source,
        }

    return describe


def load_grefcoco_json(
    refs_file: str,
    instances_file: str,
    image_root: str,
    split: str,
    *,
    dataset_name: str = "grefcoco",
    source: str = "grefcoco",
    layout: str = GREFCOCO_LAYOUT,
    expected_format: Optional[str] = "grefcoco",
) -> List[dict]:
    """One dataset dict per sentence of gRefCOCO-format refs of ``split``.

    Args:
        refs_file: ``grefs(unc).json`` or ``grefs(unc).p``.
        instances_file: the COCO ``instances.json`` beside it.
        image_root: folder that the images' ``file_name`` is relative to.
        split: ``train``, ``val``, ``testA``, ``testB`` (or the splits a synthetic set uses).
        dataset_name: for the log.
        source: the ``source`` tag of every dict.
        layout: the expected folder tree, quoted when a path is missing.
        expected_format: the family of refs this folder should hold (``grefcoco``,
            ``refcoco``; None: any); the refs of another family stop the load with a message.
    """
    require_path(refs_file, f"{dataset_name}: refs file", layout)
    require_path(instances_file, f"{dataset_name}: instances file", layout)
    require_path(image_root, f"{dataset_name}: image folder", layout)

    return load_expression_dicts(
        refs_file,
        instances_file,
        expected_format,
        split=split,
        dataset_name=dataset_name,
        image_file=lambda image: os.path.join(image_root, image["file_name"]),
        target_ids=grefcoco_target_ids,
        describe_ref=grefcoco_describer(source),
        images=ImageFolders((image_root,), layout),
    )


def register_all_grefcoco(root: Callable[[], str]) -> None:
    """Register ``grefcoco_unc_{train,val,testA,testB}``; ``root()`` is read when a split loads."""
    register_splits(
        {f"grefcoco_unc_{split}": split for split in GREFCOCO_SPLITS},
        grefcoco_paths,
        lambda paths, split, name: load_grefcoco_json(
            paths["refs_file"],
            paths["instances_file"],
            paths["image_root"],
            split,
            dataset_name=name,
        ),
        evaluator_type="grefcoco",
        root=root,
    )
