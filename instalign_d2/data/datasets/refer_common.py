"""What the REFER-style loaders share: reading refs and COCO instances, converting annotations
once, and turning refs into one Detectron2 dataset dict per sentence (docs/interfaces.md §1).

gRefCOCO, Ref-ZOM and RefCOCO/+/g all ship a list of refs (``ref_id, image_id, split, ann_id,
sentences``) beside a COCO ``instances.json``. We index the instances once (dicts keyed by id),
convert each target annotation once, and share that annotation list between the sentences of a
ref, so that gRefCOCO train (~210k sentences) loads quickly and without copies.

A file that does not parse or has the wrong shape stops the load with one line
(:mod:`instalign_d2.data.datasets.validation`). Bad entries (a ref naming an image or annotation
that does not exist, a crowd annotation, a polygon with fewer than 3 points, a zero-area mask)
are logged with the ref id and counted; the loader goes on. A ref whose targets all vanish is
skipped rather than turned into a no-target sample, which would teach the model a wrong answer.
Images are looked up with one listing per folder; the expressions of missing images are marked
``image_missing`` (:mod:`instalign_d2.data.datasets.image_presence`), and the counts of the load
are published (:mod:`instalign_d2.data.datasets.load_report`).
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence

from detectron2.structures import BoxMode

from instalign_d2.data.datasets import load_report

# DatasetLayoutError is re-exported: the loaders and their users import it from here.
from instalign_d2.data.datasets.errors import DatasetLayoutError, one_line_layout  # noqa: F401
from instalign_d2.data.datasets.image_presence import ImageFolders
from instalign_d2.data.datasets.validation import (
    check_instances,
    check_ref_format,
    check_refs,
    read_json_file,
    read_refs_file,
)
from instalign_d2.data.masks import MIN_POLYGON_COORDS, mask_area

logger = logging.getLogger(__name__)

# How many examples of each kind of bad entry are logged one by one before only counting.
LOGGED_EXAMPLES_PER_REASON = 5


def require_path(path: str, what: str, layout: str) -> str:
    """``path`` if it exists, else a :class:`DatasetLayoutError` naming it and the expected layout."""
    if os.path.exists(path):
        return path
    raise DatasetLayoutError(
        f"{what} not found: {os.path.abspath(path)}. Expected under $DETECTRON2_DATASETS "
        f"(default ./datasets): {one_line_layout(layout)}"
    )


def first_existing(candidates: Sequence[str]) -> Optional[str]:
    """The first path of ``candidates`` that exists, or None."""
    for path in candidates:
        if os.path.exists(path):
            return path
    return None


def load_refs(path: str, expected_format: Optional[str] = None) -> List[Mapping]:
    """The list of refs in a ``.json`` or a pickled (``.p``) refs file, checked.

    The pickles are those the dataset authors publish (a trusted source; pickle runs code, so
    never point this at an untrusted file). A file that does not parse, is not a list of refs
    with the keys the loader reads, or holds the refs of another family than
    ``expected_format`` (``grefcoco``, ``refzom``, ``refcoco``; None: any) raises
    :class:`~instalign_d2.data.datasets.errors.DatasetError`.
    """
    refs = check_refs(read_refs_file(path), path)
    check_ref_format(refs, path, expected_format)
    return refs


@dataclass
class CocoIndex:
    """A COCO ``instances.json`` indexed by id."""

    images: Dict[int, dict]
    annotations: Dict[int, dict]
    categories: Dict[int, dict]

    @classmethod
    def from_file(cls, path: str) -> "CocoIndex":
        data = check_instances(read_json_file(path, "instances file"), path)
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
        self.last_reason = ""  # why the last get() returned None

    def get(self, ann_id: int, image: Mapping, ref_id) -> Optional[dict]:
        """The converted annotation, or None (the reason is counted under the ref's id and kept
        in ``last_reason``)."""
        if ann_id not in self._converted:
            self._converted[ann_id] = self._convert(ann_id, image)
        converted = self._converted[ann_id]
        if converted is None:
            self.last_reason = self._reasons[ann_id]
        elif self._owner_image[ann_id] != image["id"]:
            self.last_reason = "annotation_of_another_image"
            converted = None
        if converted is None:
            self.skips.skip(self.last_reason, ref_id, f"annotation {ann_id}")
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
            kept = [
                p
                for p in segmentation
                if isinstance(p, (list, tuple)) and len(p) >= MIN_POLYGON_COORDS and len(p) % 2 == 0
            ]
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
        except (ValueError, TypeError, KeyError):
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
    images: ImageFolders,
    refs_file: str = "",
) -> List[dict]:
    """One dataset dict per sentence of the refs of ``split`` (docs/interfaces.md §1).

    The expressions of an image missing from disk are kept, marked ``image_missing``: training
    leaves them out, evaluation counts them as skipped (``instalign_d2/data/checked.py``
    decides, with the share of missing images). A split whose images are all missing raises
    :class:`~instalign_d2.data.datasets.errors.DatasetError`. The counts of the load are
    published as a :class:`~instalign_d2.data.datasets.load_report.LoadReport`.

    Args:
        refs: the dataset's refs (all splits), already checked (:func:`load_refs`).
        index: its instances, indexed by id.
        split: the split to keep (refs carry it in ``split``).
        dataset_name: for the log and the report.
        image_file: the image path of an ``images`` entry.
        target_ids: the target annotation ids of a ref (empty for a no-target ref).
        describe_ref: the per-ref fields (``empty``, ``expression_kind``, ``source``, ...),
            given the ref and the targets that survived the checks.
        images: the image folders, listed once to find the missing images.
        refs_file: the refs file, named in the report's messages.
    """
    skips = SkipLog(dataset_name)
    report = load_report.LoadReport(
        dataset_name, split, refs_file=refs_file, image_folders=images.folders
    )
    load_report.forget(dataset_name)  # a load that fails leaves no stale report behind
    converter = AnnotationConverter(index, skips)
    dataset_dicts: List[dict] = []
    image_paths: Dict[int, str] = {}
    for ref in refs:
        report.splits_in_file[str(ref["split"])] += 1
        if ref["split"] != split:
            continue
        report.refs_in_split += 1
        ref_id = ref["ref_id"]
        image = index.images.get(ref["image_id"])
        if image is None:
            skips.skip("image_not_in_instances", ref_id, f"image {ref['image_id']}")
            report.refs_skipped["image_not_in_instances"] += 1
            continue
        wanted = target_ids(ref)
        annotations, reasons = [], set()
        for ann_id in wanted:
            converted = converter.get(ann_id, image, ref_id)
            if converted is None:
                reasons.add(converter.last_reason)
            else:
                annotations.append(converted)
        if wanted and not annotations:
            skips.skip("no_usable_target", ref_id)
            report.refs_skipped[reasons.pop() if len(reasons) == 1 else "no_usable_target"] += 1
            continue
        sentences = ref["sentences"]
        if not sentences:
            skips.skip("no_sentence", ref_id)
            report.refs_skipped["no_sentence"] += 1
            continue
        if image["id"] not in image_paths:
            image_paths[image["id"]] = image_file(image)
        per_ref = describe_ref(ref, annotations)
        report.refs_kept += 1
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
    report.expressions = len(dataset_dicts)
    report.images = len(image_paths)
    report.missing_images = images.missing(set(image_paths.values()), dataset_name)
    _mark_missing_images(dataset_dicts, report)
    load_report.publish(report)
    kinds = Counter(d["expression_kind"] for d in dataset_dicts)
    logger.info(
        "%s: %d expressions of %d refs on %d images (%s); skipped: %s%s",
        dataset_name,
        len(dataset_dicts),
        report.refs_kept,
        len(image_paths),
        ", ".join(f"{k} {kinds[k]}" for k in ("single", "multi", "no_target")),
        skips.summary(),
        f"; images missing: {len(report.missing_images)}" if report.missing_images else "",
    )
    return dataset_dicts


def load_expression_dicts(
    refs_file: str,
    instances_file: str,
    expected_format: Optional[str],
    **build_kwargs,
) -> List[dict]:
    """Read and check the refs (:func:`load_refs`) and the instances, then
    :func:`build_expression_dicts` with ``build_kwargs``; logs how long the whole load took."""
    start = time.perf_counter()
    refs = load_refs(refs_file, expected_format)
    index = CocoIndex.from_file(instances_file)
    dicts = build_expression_dicts(refs, index, refs_file=refs_file, **build_kwargs)
    logger.info(
        "%s: loaded in %.2f s from %s",
        build_kwargs["dataset_name"],
        time.perf_counter() - start,
        refs_file,
    )
    return dicts


def _mark_missing_images(dataset_dicts: List[dict], report: load_report.LoadReport) -> None:
    """Mark the expressions of missing images and count their refs as skipped for that."""
    if not report.missing_images:
        return
    missing = set(report.missing_images)
    refs = set()
    for record in dataset_dicts:
        if record["file_name"] in missing:
            record["image_missing"] = True
            refs.add(record["sentence"]["ref_id"])
    report.refs_skipped["image_missing"] += len(refs)
