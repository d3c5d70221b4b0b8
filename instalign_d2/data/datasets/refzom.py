"""Ref-ZOM (Hu et al., ICCV 2023, "Beyond One-to-One") in its published REFER layout.

``ref-zom/refs(final).p`` (the download is called ``Ref-ZOM(final).p``; both names are accepted)
beside ``ref-zom/instances.json``. A ref's ``source`` is ``"zero"`` for a one-to-zero (no target)
expression, whose ``ann_id`` is not a target; other refs are one-to-one or one-to-many (several
``ann_id``s). Images are COCO train2014 and val2014; the authors' code reads them from one merged
folder ``images/trainval2014/``, and the COCO name prefix tells the two original folders apart,
so we look in ``trainval2014`` first and fall back to ``train2014`` / ``val2014``.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Mapping, Optional

from instalign_d2.data.datasets.catalog import register_splits
from instalign_d2.data.datasets.errors import one_line_layout
from instalign_d2.data.datasets.image_presence import ImageFolders
from instalign_d2.data.datasets.refer_common import (
    DatasetLayoutError,
    as_id_list,
    first_existing,
    kind_of_target_count,
    load_expression_dicts,
    require_path,
)

REFZOM_SPLITS = ("train", "test")
ZERO_SOURCE = "zero"  # Ref-ZOM's tag of one-to-zero refs
REFZOM_KIND_OF_COUNT = {0: "one_to_zero", 1: "one_to_one"}  # more targets: one_to_many

REFZOM_LAYOUT = """\
  ref-zom/
    refs(final).p          (the download "Ref-ZOM(final).p" is accepted too)
    instances.json
  images/
    trainval2014/          COCO train2014 + val2014 merged, as the authors' code expects
    (or train2014/ and val2014/ side by side)"""


def refzom_paths(datasets_root: str) -> Dict[str, str]:
    """Where Ref-ZOM's files are expected under ``datasets_root`` (nothing is checked here)."""
    folder = os.path.join(datasets_root, "ref-zom")
    default_refs = os.path.join(folder, "refs(final).p")
    refs_file = (
        first_existing([default_refs, os.path.join(folder, "Ref-ZOM(final).p")]) or default_refs
    )
    images = os.path.join(datasets_root, "images")
    return {
        "dataset_root": folder,
        "refs_file": refs_file,
        "instances_file": os.path.join(folder, "instances.json"),
        "image_root": os.path.join(images, "trainval2014"),
        "train_image_root": os.path.join(images, "train2014"),
        "val_image_root": os.path.join(images, "val2014"),
    }


def refzom_target_ids(ref: Mapping) -> List[int]:
    """Target annotation ids: none for a one-to-zero ref, whatever its ``ann_id`` says."""
    if ref.get("source") == ZERO_SOURCE:
        return []
    return [i for i in as_id_list(ref.get("ann_id")) if i >= 0]


def make_image_locator(
    merged_root: str, train_root: str, val_root: str, folders: Optional[ImageFolders] = None
) -> Callable[[Mapping], str]:
    """Path of a COCO image: in the merged folder if there, else the folder its name prefix says.

    ``folders`` (listed once each) answers "is it there"; 20k ``stat`` calls cost far more.
    """
    folders = folders or ImageFolders((merged_root, train_root, val_root), REFZOM_LAYOUT)
    have_merged = os.path.isdir(merged_root)

    def locate(image: Mapping) -> str:
        name = image["file_name"]
        merged = os.path.join(merged_root, name)
        if have_merged and folders.exists(merged):
            return merged
        fallback = val_root if "val2014" in name else train_root
        candidate = os.path.join(fallback, name)
        # When neither has it, report the merged path: the layout the authors document.
        return candidate if (folders.exists(candidate) or not have_merged) else merged

    return locate


def load_refzom(
    refs_file: str,
    instances_file: str,
    split: str,
    *,
    image_root: str,
    train_image_root: str,
    val_image_root: str,
    dataset_name: str = "refzom",
) -> List[dict]:
    """One dataset dict per sentence of the Ref-ZOM refs of ``split`` (``train`` or ``test``).

    Each dict carries ``source`` (the ref's own tag) and ``refzom_kind`` (``one_to_one``,
    ``one_to_many`` or ``one_to_zero``) besides the common fields.
    """
    require_path(refs_file, f"{dataset_name}: refs file", REFZOM_LAYOUT)
    require_path(instances_file, f"{dataset_name}: instances file", REFZOM_LAYOUT)
    if not any(os.path.isdir(p) for p in (image_root, train_image_root, val_image_root)):
        raise DatasetLayoutError(
            f"{dataset_name}: image folder not found: {os.path.abspath(image_root)} "
            f"(nor {os.path.abspath(train_image_root)} / {os.path.abspath(val_image_root)}). "
            f"Expected under $DETECTRON2_DATASETS (default ./datasets): "
            f"{one_line_layout(REFZOM_LAYOUT)}"
        )
    folders = ImageFolders((image_root, train_image_root, val_image_root), REFZOM_LAYOUT)

    def describe(ref: Mapping, targets: List[dict]) -> Dict[str, object]:
        count = len(targets)
        return {
            "empty": count == 0,
            "expression_kind": kind_of_target_count(count),
            "refzom_kind": REFZOM_KIND_OF_COUNT.get(count, "one_to_many"),
            "source": str(ref.get("source", "")),
        }

    return load_expression_dicts(
        refs_file,
        instances_file,
        "refzom",
        split=split,
        dataset_name=dataset_name,
        image_file=make_image_locator(image_root, train_image_root, val_image_root, folders),
        target_ids=refzom_target_ids,
        describe_ref=describe,
        images=folders,
    )


def register_all_refzom(root: Callable[[], str]) -> None:
    """Register ``refzom_final_{train,test}``; ``root()`` is read when a split loads."""
    register_splits(
        {f"refzom_final_{split}": split for split in REFZOM_SPLITS},
        refzom_paths,
        lambda paths, split, name: load_refzom(
            paths["refs_file"],
            paths["instances_file"],
            split,
            image_root=paths["image_root"],
            train_image_root=paths["train_image_root"],
            val_image_root=paths["val_image_root"],
            dataset_name=name,
        ),
        evaluator_type="refzom",
        root=root,
    )
