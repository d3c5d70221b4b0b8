"""RefCOCO, RefCOCO+ and RefCOCOg (classic RES, one target per ref) in their REFER layout.

Registered under the names ReLA uses, so users' configs carry over: ``refcoco_unc_*``,
``refcoco+_unc_*`` (alias ``refcocop_unc_*``, as a ``+`` is awkward in some shells and file
names), ``refcocog_umd_*`` and ``refcocog_google_*``.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List

from instalign_d2.data.datasets.catalog import register_gres_dataset
from instalign_d2.data.datasets.grefcoco import load_grefcoco_json
from instalign_d2.data.datasets.refer_common import first_existing

# (folder, split_by) -> splits; the registered name is f"{name}_{split_by}_{split}".
REFCOCO_VARIANTS = {
    ("refcoco", "unc"): ("train", "val", "testA", "testB"),
    ("refcoco+", "unc"): ("train", "val", "testA", "testB"),
    ("refcocog", "umd"): ("train", "val", "test"),
    ("refcocog", "google"): ("train", "val"),
}
NAME_ALIASES = {"refcoco+": ("refcocop",)}

REFCOCO_LAYOUT = """\
  refcoco/    refs(unc).p     instances.json
  refcoco+/   refs(unc).p     instances.json
  refcocog/   refs(umd).p     refs(google).p     instances.json
  images/
    train2014/                COCO train2014 images (COCO_train2014_*.jpg)"""


def refcoco_paths(datasets_root: str, folder: str, split_by: str) -> Dict[str, str]:
    """Where a RefCOCO-family dataset's files are expected (nothing is checked here)."""
    dataset_root = os.path.join(datasets_root, folder)
    pickled = os.path.join(dataset_root, f"refs({split_by}).p")
    refs_file = (
        first_existing([pickled, os.path.join(dataset_root, f"refs({split_by}).json")]) or pickled
    )
    return {
        "dataset_root": dataset_root,
        "refs_file": refs_file,
        "instances_file": os.path.join(dataset_root, "instances.json"),
        "image_root": os.path.join(datasets_root, "images", "train2014"),
    }


def load_refcoco(
    refs_file: str,
    instances_file: str,
    image_root: str,
    split: str,
    *,
    dataset_name: str = "refcoco",
    source: str = "refcoco",
) -> List[dict]:
    """One dataset dict per sentence of the refs of ``split``; each has exactly one target.

    The REFER refs of RefCOCO/+/g are gRefCOCO's format with one ``ann_id`` per ref, so the
    gRefCOCO loader reads them.
    """
    return load_grefcoco_json(
        refs_file,
        instances_file,
        image_root,
        split,
        dataset_name=dataset_name,
        source=source,
        layout=REFCOCO_LAYOUT,
    )


def refcoco_dataset_names() -> List[str]:
    """Every name this module registers (aliases included)."""
    names = []
    for (folder, split_by), splits in REFCOCO_VARIANTS.items():
        for prefix in (folder,) + NAME_ALIASES.get(folder, ()):
            names += [f"{prefix}_{split_by}_{split}" for split in splits]
    return names


def register_all_refcoco(root: Callable[[], str]) -> None:
    """Register the RefCOCO family; ``root()`` is read when a split loads."""
    for (folder, split_by), splits in REFCOCO_VARIANTS.items():
        for split in splits:
            for prefix in (folder,) + NAME_ALIASES.get(folder, ()):
                name = f"{prefix}_{split_by}_{split}"

                def load(folder=folder, split_by=split_by, split=split, name=name):
                    paths = refcoco_paths(root(), folder, split_by)
                    dicts = load_refcoco(
                        paths["refs_file"],
                        paths["instances_file"],
                        paths["image_root"],
                        split,
                        dataset_name=name,
                        source=folder,
                    )
                    return dicts, {
                        "dataset_root": paths["dataset_root"],
                        "image_root": paths["image_root"],
                    }

                paths = refcoco_paths(root(), folder, split_by)
                register_gres_dataset(
                    name,
                    load,
                    evaluator_type="refcoco",
                    split=split,
                    dataset_root=paths["dataset_root"],
                    image_root=paths["image_root"],
                )
