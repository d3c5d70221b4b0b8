"""Registration of the synthetic GRES splits ``synthetic_gres_{train,val,test}``, of two
training additions made from the instances: ``synthetic_gres_train_all_objects`` (one "all
shapes" expression per training image) and ``synthetic_gres_train_more_spatial`` (more spatial
expressions), and of ``synthetic_gres_train_shape_colour`` (the train split with each object's
category the pair of its shape and colour).

The set is written in the gRefCOCO layout by :mod:`instalign_d2.synthetic` (``train_net.py`` does
it on first use), so the gRefCOCO loader reads it; its sentences also record their template.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional

import numpy as np

from instalign_d2.data.datasets.catalog import register_splits
from instalign_d2.data.datasets.grefcoco import (
    grefcoco_describer,
    grefcoco_target_ids,
    load_grefcoco_json,
)
from instalign_d2.data.datasets.image_presence import ImageFolders
from instalign_d2.data.datasets.refer_common import CocoIndex, build_expression_dicts, load_refs
from instalign_d2.synthetic.expressions import noun_phrase, spatial_candidates
from instalign_d2.synthetic.scene import COLOURS, SHAPES
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


def _objects_by_image(index: CocoIndex, split: str) -> Dict[int, List[dict]]:
    """The annotations of each image of ``split`` that has objects, in annotation id order."""
    prefix = split + "/"
    objects: Dict[int, List[dict]] = {}
    for ann in sorted(index.annotations.values(), key=lambda a: a["id"]):
        objects.setdefault(ann["image_id"], []).append(ann)
    return {
        image_id: objects[image_id]
        for image_id, image in sorted(index.images.items())
        if image["file_name"].startswith(prefix) and image_id in objects
    }


def _added_expression_dicts(
    root: str, split: str, dataset_name: str, make_refs: Callable[[CocoIndex], List[dict]]
) -> List[dict]:
    """Dataset dicts of refs made from the instances of a generated set (not from its refs)."""
    paths = synthetic_paths(root)
    index = CocoIndex.from_file(paths["instances_file"])
    return build_expression_dicts(
        make_refs(index),
        index,
        split=split,
        dataset_name=dataset_name,
        image_file=lambda image: os.path.join(paths["image_root"], image["file_name"]),
        target_ids=grefcoco_target_ids,
        describe_ref=grefcoco_describer("synthetic_gres"),
        images=ImageFolders((paths["image_root"],), SYNTHETIC_LAYOUT),
        refs_file=paths["instances_file"],
    )


def _added_ref(ref_id: int, image_id: int, split: str, targets, text: str, template: str) -> dict:
    return {
        "ref_id": ref_id,
        "image_id": image_id,
        "split": split,
        "ann_id": sorted(a["id"] for a in targets),
        "sentences": [{"sent_id": ref_id, "raw": text, "expression_template": template}],
    }


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

    def refs(index: CocoIndex) -> List[dict]:
        return [
            _added_ref(
                ALL_OBJECTS_ID_OFFSET + image_id,
                image_id,
                split,
                objects,
                ALL_OBJECTS_EXPRESSION,
                ALL_OBJECTS_TEMPLATE,
            )
            for image_id, objects in _objects_by_image(index, split).items()
        ]

    return _added_expression_dicts(
        root, split, dataset_name or f"synthetic_gres_{split}{ALL_OBJECTS_SUFFIX}", refs
    )


# More spatial expressions for training: the generator draws one template per expression, so
# spatial ones ("the leftmost triangle") are about a tenth of the training expressions although
# most images allow several. This split adds, per image, up to SPATIAL_EXTRA_PER_IMAGE of those the
# image allows and the generator did not draw.
SPATIAL_SUFFIX = "_more_spatial"
SPATIAL_EXTRA_PER_IMAGE = 2
SPATIAL_ID_OFFSET = 20_000_000  # ids image_id * SPATIAL_EXTRA_PER_IMAGE + j above this


def load_synthetic_more_spatial(
    root: str, split: str, dataset_name: Optional[str] = None
) -> List[dict]:
    """Up to :data:`SPATIAL_EXTRA_PER_IMAGE` spatial expressions per image of ``split``.

    Each is one of the generator's spatial expressions for the image's objects (the extreme of a
    group of two or more, well apart from the next) that is not already among the image's
    expressions, drawn with a generator seeded by the image id (so the same on every run).
    """
    paths = synthetic_paths(root)
    present: Dict[int, set] = {}
    for ref in load_refs(paths["refs_file"]):
        present.setdefault(ref["image_id"], set()).update(
            s["raw"] for s in ref.get("sentences", ())
        )

    def refs(index: CocoIndex) -> List[dict]:
        out = []
        for image_id, objects in _objects_by_image(index, split).items():
            size = index.images[image_id]["width"]
            candidates = {}  # text -> target, in the generator's order
            for filt, word, target in spatial_candidates(
                objects, [o["center"] for o in objects], size
            ):
                candidates.setdefault(f"the {word} {noun_phrase(filt)}", target)
            texts = [t for t in candidates if t not in present.get(image_id, ())]
            rng = np.random.default_rng(image_id)
            chosen = rng.permutation(len(texts))[:SPATIAL_EXTRA_PER_IMAGE]
            for j, k in enumerate(sorted(chosen)):
                out.append(
                    _added_ref(
                        SPATIAL_ID_OFFSET + image_id * SPATIAL_EXTRA_PER_IMAGE + j,
                        image_id,
                        split,
                        [objects[candidates[texts[k]]]],
                        texts[k],
                        "spatial",
                    )
                )
        return out

    return _added_expression_dicts(
        root, split, dataset_name or f"synthetic_gres_{split}{SPATIAL_SUFFIX}", refs
    )


# The categories of the generated set are the five shapes. This split is the train split with
# each object's category the pair (shape, colour) instead: 25 categories, ids 1..25 (set
# MODEL.INSTALIGN.CATEGORY_CLASSES to SHAPE_COLOUR_CLASSES), so that the category loss asks each
# matched query to keep its object's colour as well as its shape.
SHAPE_COLOUR_SUFFIX = "_shape_colour"
SHAPE_COLOUR_CLASSES = 1 + len(SHAPES) * len(COLOURS)  # id 0 is never a target


def shape_colour_category(shape: str, colour: str) -> int:
    """The category id of a (shape, colour) pair: 1 + shape index * 5 + colour index."""
    return 1 + SHAPES.index(shape) * len(COLOURS) + list(COLOURS).index(colour)


def load_synthetic_shape_colour(
    root: str, split: str, dataset_name: Optional[str] = None
) -> List[dict]:
    """The dataset dicts of ``split``, each target's ``category_id`` its (shape, colour) pair.

    Each dict also lists, as ``image_annotations``, every object of its image with that category
    (one list shared by the image's expressions), for the dense category loss
    (``MODEL.INSTALIGN.DENSE_CATEGORY_WEIGHT``).
    """
    dicts = load_synthetic_gres(
        root, split, dataset_name or f"synthetic_gres_{split}{SHAPE_COLOUR_SUFFIX}"
    )
    index = CocoIndex.from_file(synthetic_paths(root)["instances_file"])
    objects = index.annotations
    for record in dicts:
        for ann in record.get("annotations") or ():
            obj = objects[ann["id"]]
            ann["category_id"] = shape_colour_category(obj["shape"], obj["colour"])
    image_objects = {
        image_id: [
            {
                "id": obj["id"],
                "bbox": list(obj["bbox"]),
                "segmentation": obj["segmentation"],
                "category_id": shape_colour_category(obj["shape"], obj["colour"]),
            }
            for obj in image_objs
        ]
        for image_id, image_objs in _objects_by_image(index, split).items()
    }
    for record in dicts:
        record["image_annotations"] = image_objects.get(record["image_id"], [])
    return dicts


def register_all_synthetic_gres(root: Callable[[], str]) -> None:
    """Register ``synthetic_gres_{train,val,test}`` and the training additions under
    ``root()/synthetic_gres`` (read at load)."""
    splits = {f"synthetic_gres_{split}": (split, load_synthetic_gres) for split in SYNTHETIC_SPLITS}
    splits[f"synthetic_gres_train{ALL_OBJECTS_SUFFIX}"] = ("train", load_synthetic_all_objects)
    splits[f"synthetic_gres_train{SPATIAL_SUFFIX}"] = ("train", load_synthetic_more_spatial)
    splits[f"synthetic_gres_train{SHAPE_COLOUR_SUFFIX}"] = ("train", load_synthetic_shape_colour)
    for name, (split, load) in splits.items():
        register_splits(
            {name: split},
            lambda datasets_root: synthetic_paths(os.path.join(datasets_root, SYNTHETIC_DIRNAME)),
            lambda paths, split, name, load=load: load(paths["dataset_root"], split, name),
            evaluator_type="grefcoco",
            root=root,
        )
