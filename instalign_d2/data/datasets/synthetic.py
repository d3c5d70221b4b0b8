"""Registration of the synthetic GRES splits ``synthetic_gres_{train,val,test}`` and of
``synthetic_gres_train_all_objects`` (one "all shapes" expression per training image).

The set is written in the gRefCOCO layout by :mod:`instalign_d2.synthetic` (``train_net.py`` does
it on first use), so the gRefCOCO loader reads it; its sentences also record their template.
"""

from __future__ import annotations

import os
from typing import Callable, List, Optional

from instalign_d2.data.datasets.catalog import register_splits
from instalign_d2.data.datasets.grefcoco import (
    grefcoco_describer,
    grefcoco_target_ids,
    load_grefcoco_json,
)
from instalign_d2.data.datasets.image_presence import ImageFolders
from instalign_d2.data.datasets.refer_common import CocoIndex, build_expression_dicts
from instalign_d2.synthetic.params import (
    SYNTHETIC_DIRNAME,
    SYNTHETIC_LAYOUT,
    SYNTHETIC_SPLITS,
    synthetic_paths,
)


def load_synthetic_gres(root: str, split: str, dataset_name: Optional[str] = None) -> List[dict]:
    """Dataset dicts of one split of a generated dataset in ``root``."""
    paths = synthetic_paths(root)
    return load_grefcoco_json(
        paths["refs_file"],
        paths["instances_file"],
        paths["image_root"],
        split,
        dataset_name=dataset_name or f"synthetic_gres_{split}",
        source="synthetic_gres",
        layout=SYNTHETIC_LAYOUT,
    )


# An expression that refers to every object of its image: the instance-segmentation task of
# Mask2Former phrased as GRES. "all" and "shapes" are words of the generator's vocabulary, and the
# generated expressions never use them alone ("all red shapes" names a colour).
ALL_OBJECTS_EXPRESSION = "all shapes"
ALL_OBJECTS_TEMPLATE = "all_objects"
ALL_OBJECTS_SUFFIX = "_all_objects"
# Ids of the added refs and sentences start here, far above the generated ones.
ALL_OBJECTS_ID_OFFSET = 10_000_000


def load_synthetic_all_objects(
    root: str, split: str, dataset_name: Optional[str] = None
) -> List[dict]:
    """One dataset dict per image of ``split``: "all shapes", whose targets are all its objects.

    Added to a training split (``DATASETS.TRAIN: ("synthetic_gres_train",
    "synthetic_gres_train_all_objects")``), each image's group of expressions gets one more, so
    that every object of the image is a target of some expression: the instance masks are then
    supervised on every object, not only on the referred ones.
    """
    paths = synthetic_paths(root)
    index = CocoIndex.from_file(paths["instances_file"])
    objects_by_image = {}
    for ann in index.annotations.values():
        objects_by_image.setdefault(ann["image_id"], []).append(ann["id"])
    prefix = split + "/"
    refs = [
        {
            "ref_id": ALL_OBJECTS_ID_OFFSET + image_id,
            "image_id": image_id,
            "split": split,
            "ann_id": sorted(objects_by_image.get(image_id, [])),
            "sentences": [
                {
                    "sent_id": ALL_OBJECTS_ID_OFFSET + image_id,
                    "raw": ALL_OBJECTS_EXPRESSION,
                    "expression_template": ALL_OBJECTS_TEMPLATE,
                }
            ],
        }
        for image_id, image in sorted(index.images.items())
        if image["file_name"].startswith(prefix) and objects_by_image.get(image_id)
    ]
    return build_expression_dicts(
        refs,
        index,
        split=split,
        dataset_name=dataset_name or f"synthetic_gres_{split}{ALL_OBJECTS_SUFFIX}",
        image_file=lambda image: os.path.join(paths["image_root"], image["file_name"]),
        target_ids=grefcoco_target_ids,
        describe_ref=grefcoco_describer("synthetic_gres"),
        images=ImageFolders((paths["image_root"],), SYNTHETIC_LAYOUT),
        refs_file=paths["instances_file"],
    )


def register_all_synthetic_gres(root: Callable[[], str]) -> None:
    """Register ``synthetic_gres_{train,val,test}`` and ``synthetic_gres_train_all_objects`` under
    ``root()/synthetic_gres`` (read at load)."""
    splits = {f"synthetic_gres_{split}": (split, load_synthetic_gres) for split in SYNTHETIC_SPLITS}
    splits[f"synthetic_gres_train{ALL_OBJECTS_SUFFIX}"] = ("train", load_synthetic_all_objects)
    for name, (split, load) in splits.items():
        register_splits(
            {name: split},
            lambda datasets_root: synthetic_paths(os.path.join(datasets_root, SYNTHETIC_DIRNAME)),
            lambda paths, split, name, load=load: load(paths["dataset_root"], split, name),
            evaluator_type="grefcoco",
            root=root,
        )
