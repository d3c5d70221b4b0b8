"""RefCOCO, RefCOCO+ and RefCOCOg (classic RES, one target per ref) in their REFER layout.

Registered under the names ReLA uses, so users' configs carry over: ``refcoco_unc_*``,
``refcoco+_unc_*`` (alias ``refcocop_unc_*``, as a ``+`` is awkward in some shells and file
names), ``refcocog_umd_*`` and ``refcocog_google_*``.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Dict, List

from instalign_d2.data.datasets.catalog import register_splits
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
  refcoco/
    refs(unc).p
    instances.json
  refcoco+/
    refs(unc).p
    instances.json
  refcocog/
    refs(umd).p            (and refs(google).p for refcocog_google_*)
    instances.json
  images/
    train2014/             COCO train2014 images (COCO_train2014_*.jpg)"""


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


# ``load_refcoco(refs_file, instances_file, image_root, split, dataset_name=..., source=...)``:
# one dataset dict per sentence of the refs of ``split``; each has exactly one target. The REFER
# refs of RefCOCO/+/g are gRefCOCO's format with one ``ann_id`` per ref, so the gRefCOCO loader
# reads them, told which layout and which family of refs to expect.
load_refcoco = functools.partial(
    load_grefcoco_json,
    dataset_name="refcoco",
    source="refcoco",
    layout=REFCOCO_LAYOUT,
    expected_format="refcoco",
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
        prefixes = (folder,) + NAME_ALIASES.get(folder, ())
        register_splits(
            {f"{prefix}_{split_by}_{split}": split for split in splits for prefix in prefixes},
            functools.partial(refcoco_paths, folder=folder, split_by=split_by),
            lambda paths, split, name, folder=folder: load_refcoco(
                paths["refs_file"],
                paths["instances_file"],
                paths["image_root"],
                split,
                dataset_name=name,
                source=folder,
            ),
            evaluator_type="refcoco",
            root=root,
        )
