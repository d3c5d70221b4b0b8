"""What the REFER-style loaders share: reading refs and COCO instances, converting annotations
once, and turning refs into one Detectron2 dataset dict per sentence (docs/interfaces.md §1).

gRefCOCO, Ref-ZOM and RefCOCO/+/g all ship a list of refs (``ref_id, image_id, split, ann_id,
sentences``) beside a COCO ``instances.json``. We index the instances once (dicts keyed by id),
convert each target annotation once, and share that annotation list between the sentences of a
ref, so that gRefCOCO train (~210k sentences) loads quickly and without copies.

Bad entries (a ref naming an image or annotation that does not exist, a crowd annotation, a
polygon with fewer than 3 points, a zero-area mask) are logged with the ref id and counted; the
loader goes on. A ref whose targets all vanish is skipped rather than turned into a no-target
sample, which would teach the model a wrong answer.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence

from detectron2.structures import BoxMode

from instalign_d2.data.masks import MIN_POLYGON_COORDS, mask_area

logger = logging.getLogger(__name__)

# How many examples of each kind of bad entry are logged one by one before only counting.
LOGGED_EXAMPLES_PER_REASON = 5


class DatasetLayoutError(FileNotFoundError):
    """A dataset file or folder is not where the registered dataset expects it."""


def require_path(path: str, what: str, layout: str) -> str:
    """``path`` if it exists, else a :class:`DatasetLayoutError` naming it and the expected layout."""
    if os.path.exists(path):
        return path
    raise DatasetLayoutError(
        f"{what} not found: {os.path.abspath(path)}\n"
        f"Expected layout (under $DETECTRON2_DATASETS, default ./datasets):\n{layout}"
    )


def first_existing(candidates: Sequence[str]) -> Optional[str]:
    """The first path of ``candidates`` that exists, or None."""
    for path in candidates:
        if os.path.exists(path):
            return path
    return None


def load_refs(path: str) -> list:
    """The list of refs in a ``.json`` or a pickled (``.p``) refs file.

    The pickles are those the dataset authors publish (a trusted source; pickle runs code, so
    never point this at an untrusted file). Python 2 pickles with non-ASCII text are read as
    latin-1, the only encoding that never fails on them.
    """
    if path.endswith(".json"):
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    with open(path, "rb") as f:
        try:
            return pickle.load(f)
        except UnicodeDecodeError:
            f.seek(0)
            return pickle.load(f, encoding="latin1")


@dataclass
class CocoIndex:
    """A COCO ``instances.json`` indexed by id."""

    images: Dict[int, dict]
    annotations: Dict[int, dict]
    categories: Dict[int, dict]

    @classmethod
    def from_file(cls, path: str) -> "CocoIndex":
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
        return cls(
            images={img["id"]: img for img in data.get("images", [])},
            annotations={ann["id"]: ann for ann in data.get("annotations", [])},
            categories={cat["id"]: cat for cat in data.get("categories", [])},
        )


@dataclass
class SkipLog:
    """Counts bad entries by reason and logs the first few of each with their ref id."""

    dataset_name: str
    counts: Counter = field(default_factory=Counter)

    def skip(self, reason: str, ref_id, detail: str = "") -> None:
        self.counts[reason] += 1
        if self.counts[reason] <= LOGGED_EXAMPLES_PER_REASON:
            logger.warning(
                "%s: ref %s: %s%s",
                self.dataset_name,
                ref_id,
                reason,
                f" ({detail})" if detail else "",
            )

    def summary(self) -> str:
        return ", ".join(f"{reason}: {n}" for reason, n in sorted(self.counts.items())) or "none"


class AnnotationConverter:
    """Turns COCO annotations into Detectron2 annotation dicts, once per annotation id.

    Returns the same dict object every time an id is asked for, so refs and sentences that
    name the same instance share it.
    """

    def __init__(self, index: CocoIndex, skips: SkipLog):
        self.index = index
        self.skips = skips
        self._converted: Dict[int, Optional[dict]] = {}
        self._reasons: Dict[int, str] = {}
        self._owner_image: Dict[int, object] = {}

    def get(self, ann_id: int, image: Mapping, ref_id) -> Optional[dict]:
        """The converted annotation, or None (the reason is counted under the ref's id)."""
        if ann_id not in self._converted:
            self._converted[ann_id] = self._convert(ann_id, image)
        converted = self._converted[ann_id]
        if converted is None:
            self.skips.skip(self._reasons[ann_id], ref_id, f"annotation {ann_id}")
        elif self._owner_image[ann_id] != image["id"]:
            self.skips.skip("annotation_of_another_image", ref_id, f"annotation {ann_id}")
            return None
        return converted

    def _reject(self, ann_id: int, reason: str) -> None:
        self._reasons[ann_id] = reason

    def _convert(self, ann_id: int, image: Mapping) -> Optional[dict]:
        ann = self.index.annotations.get(ann_id)
        if ann is None:
            return self._reject(ann_id, "missing_annotation")
        if ann.get("iscrowd", 0):
            return self._reject(ann_id, "crowd_annotation")
        segmentation = ann.get("segmentation")
        if isinstance(segmentation, list):
            kept = [p for p in segmentation if len(p) >= MIN_POLYGON_COORDS and len(p) % 2 == 0]
            dropped = len(segmentation) - len(kept)
            if dropped:
                self.skips.counts["invalid_polygons_dropped"] += dropped
            if not kept:
                return self._reject(ann_id, "no_valid_polygon")
            segmentation = kept
        elif not isinstance(segmentation, dict):
            return self._reject(ann_id, "missing_segmentation")
        # The owning image's size decodes the mask (the annotation's own image, not the ref's).
        self._owner_image[ann_id] = ann.get("image_id")
        owner = self.index.images.get(ann.get("image_id"), image)
        try:
            area = mask_area(segmentation, owner["height"], owner["width"])
        except (ValueError, TypeError):
            return self._reject(ann_id, "undecodable_segmentation")
        if area == 0:
            return self._reject(ann_id, "zero_area_mask")
        return {
            "id": ann_id,
            "bbox": list(ann["bbox"]),
            "bbox_mode": BoxMode.XYWH_ABS,
            "category_id": ann["category_id"],
            "segmentation": segmentation,
            "iscrowd": 0,
        }


def as_id_list(value) -> List[int]:
    """``ann_id``/``category_id`` of a ref as a list (gRefCOCO stores lists, REFER ints)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def kind_of_target_count(count: int) -> str:
    """``expression_kind`` of an expression with ``count`` target instances."""
    return "no_target" if count == 0 else ("single" if count == 1 else "multi")


# A ref describer gets (ref, kept targets) and returns the per-ref fields of the dataset dict:
# at least ``empty``, ``expression_kind`` and ``source``.
RefDescriber = Callable[[Mapping, List[dict]], Dict[str, object]]


def build_expression_dicts(
    refs: Iterable[Mapping],
    index: CocoIndex,
    *,
    split: str,
    dataset_name: str,
    image_file: Callable[[Mapping], str],
    target_ids: Callable[[Mapping], List[int]],
    describe_ref: RefDescriber,
) -> List[dict]:
    """One dataset dict per sentence of the refs of ``split`` (docs/interfaces.md §1).

    Args:
        refs: the dataset's refs (all splits).
        index: its instances, indexed by id.
        split: the split to keep (refs carry it in ``split``).
        dataset_name: for the log.
        image_file: the image path of an ``images`` entry.
        target_ids: the target annotation ids of a ref (empty for a no-target ref).
        describe_ref: the per-ref fields (``empty``, ``expression_kind``, ``source``, ...),
            given the ref and the targets that survived the checks.
    """
    skips = SkipLog(dataset_name)
    converter = AnnotationConverter(index, skips)
    dataset_dicts: List[dict] = []
    num_refs = 0
    image_paths: Dict[int, str] = {}
    for ref in refs:
        if ref.get("split") != split:
            continue
        ref_id = ref.get("ref_id")
        image = index.images.get(ref.get("image_id"))
        if image is None:
            skips.skip("image_not_in_instances", ref_id, f"image {ref.get('image_id')}")
            continue
        wanted = target_ids(ref)
        annotations = [
            a for a in (converter.get(i, image, ref_id) for i in wanted) if a is not None
        ]
        if wanted and not annotations:
            skips.skip("no_usable_target", ref_id)
            continue
        sentences = ref.get("sentences") or []
        if not sentences:
            skips.skip("no_sentence", ref_id)
            continue
        if image["id"] not in image_paths:
            image_paths[image["id"]] = image_file(image)
        per_ref = describe_ref(ref, annotations)
        num_refs += 1
        for sentence in sentences:
            record = {
                "file_name": image_paths[image["id"]],
                "height": image["height"],
                "width": image["width"],
                "image_id": image["id"],
                "annotations": annotations,  # shared by the ref's sentences, never copied
                "sentence": {
                    "raw": sentence.get("raw", sentence.get("sent", "")),
                    "sent_id": sentence.get("sent_id"),
                    "ref_id": ref_id,
                },
            }
            record.update(per_ref)
            if "expression_template" in sentence:
                record["expression_template"] = sentence["expression_template"]
            dataset_dicts.append(record)
    kinds = Counter(d["expression_kind"] for d in dataset_dicts)
    logger.info(
        "%s: %d expressions of %d refs on %d images (%s); skipped: %s",
        dataset_name,
        len(dataset_dicts),
        num_refs,
        len(image_paths),
        ", ".join(f"{k} {kinds[k]}" for k in ("single", "multi", "no_target")),
        skips.summary(),
    )
    return dataset_dicts
