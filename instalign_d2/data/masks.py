"""Ground-truth masks from COCO-style annotations: the one place that turns annotations into masks.

The mapper (training targets), the evaluator's tools and the tests all call these functions, so
every GT mask in the project agrees bit for bit: pycocotools decodes polygons, compressed RLE and
uncompressed RLE; the merged mask is their union; resizing is nearest neighbour through
Detectron2's ``ResizeTransform`` (PIL ``NEAREST``), exactly what the mapper applies.

Nearest-neighbour resizing picks one source pixel per output pixel, so "union, then resize" and
"resize each, then union" give the same mask; ``merged_mask(..., out_size=S)`` therefore equals
the mapper's ``gt_mask_merged``.
"""

from __future__ import annotations

from typing import Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pycocotools.mask as mask_util
from detectron2.data import transforms as T
from PIL import Image

Size = Union[int, Tuple[int, int]]

# A polygon needs at least 3 points (6 coordinates); pycocotools rejects shorter ones.
MIN_POLYGON_COORDS = 6


def valid_polygons(polygons: Iterable[Sequence[float]]) -> List[List[float]]:
    """The polygons with at least 3 points (an even number of coordinates), as float lists."""
    return [
        [float(v) for v in polygon]
        for polygon in polygons
        if len(polygon) >= MIN_POLYGON_COORDS and len(polygon) % 2 == 0
    ]


def segmentation_to_rle(segmentation, height: int, width: int) -> dict:
    """One compressed RLE (pycocotools dict, ``counts`` bytes) of a COCO ``segmentation``.

    Accepts a list of polygons (invalid ones, < 3 points, are ignored), a compressed RLE
    (``counts`` str or bytes) or an uncompressed RLE (``counts`` a list of run lengths).
    """
    if isinstance(segmentation, Mapping):
        size = [int(s) for s in segmentation.get("size", ())]
        if size != [int(height), int(width)]:
            raise ValueError(
                f"RLE size {size} does not match the image size [{height}, {width}]; "
                "the annotation belongs to another image or its 'size' field is wrong."
            )
        counts = segmentation["counts"]
        if isinstance(counts, list):  # uncompressed RLE
            return mask_util.frPyObjects(dict(segmentation), height, width)
        if isinstance(counts, str):
            counts = counts.encode("ascii")
        return {"size": size, "counts": counts}
    if isinstance(segmentation, (list, tuple)):
        polygons = valid_polygons(segmentation)
        if not polygons:  # nothing drawable: an empty mask
            return mask_util.encode(np.zeros((height, width), dtype=np.uint8, order="F"))
        return mask_util.merge(mask_util.frPyObjects(polygons, height, width))
    raise TypeError(
        f"Unknown segmentation type {type(segmentation).__name__}: expected a list of polygons "
        "or an RLE dict with 'size' and 'counts'."
    )


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    """``bool (H, W)`` mask of one COCO ``segmentation``."""
    return mask_util.decode(segmentation_to_rle(segmentation, height, width)).astype(bool)


def instance_masks(annotations: Sequence[Mapping], height: int, width: int) -> np.ndarray:
    """``bool (M, H, W)``: one mask per annotation (M = 0 for a no-target expression)."""
    masks = np.zeros((len(annotations), height, width), dtype=bool)
    for i, annotation in enumerate(annotations):
        masks[i] = decode_segmentation(annotation["segmentation"], height, width)
    return masks


def merged_mask(
    annotations: Sequence[Mapping], height: int, width: int, out_size: Optional[Size] = None
) -> np.ndarray:
    """``bool`` union of the annotations' masks at ``(height, width)``, or resized to ``out_size``.

    ``out_size`` is an int S (S x S, as the mapper) or ``(h, w)``; the resize is nearest
    neighbour, identical to the mapper's. All zero when ``annotations`` is empty.
    """
    if annotations:
        rles = [segmentation_to_rle(a["segmentation"], height, width) for a in annotations]
        merged = mask_util.decode(mask_util.merge(rles, intersect=False)).astype(bool)
    else:
        merged = np.zeros((height, width), dtype=bool)
    if out_size is None:
        return merged
    return resize_masks_nearest(merged, out_size)


def _as_hw(size: Size) -> Tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def transform_masks(masks: np.ndarray, transforms: T.Transform) -> np.ndarray:
    """Apply Detectron2 ``transforms`` (a Transform or TransformList) to ``bool (..., H, W)`` masks.

    Masks go through ``apply_segmentation`` as uint8, the PIL path, which is nearest neighbour
    for resizes; every caller shares this, so masks agree bit for bit.
    """
    masks = np.asarray(masks, dtype=bool)
    single = masks.ndim == 2
    stack = masks[None] if single else masks
    out = [transforms.apply_segmentation(m.astype(np.uint8)).astype(bool) for m in stack]
    if out:
        result = np.stack(out)
    else:  # M = 0: learn the output size from a dummy mask
        probe = transforms.apply_segmentation(np.zeros(stack.shape[1:], dtype=np.uint8))
        result = np.zeros((0,) + probe.shape[:2], dtype=bool)
    return result[0] if single else result


def resize_masks_nearest(masks: np.ndarray, out_size: Size) -> np.ndarray:
    """Nearest-neighbour resize of ``bool (H, W)`` or ``(M, H, W)`` masks to ``out_size``."""
    masks = np.asarray(masks, dtype=bool)
    height, width = masks.shape[-2:]
    new_h, new_w = _as_hw(out_size)
    return transform_masks(
        masks, T.ResizeTransform(height, width, new_h, new_w, interp=Image.NEAREST)
    )


def mask_area(segmentation, height: int, width: int) -> int:
    """Number of pixels of one COCO ``segmentation`` (without decoding it to a dense mask)."""
    return int(mask_util.area(segmentation_to_rle(segmentation, height, width)))


def mask_to_rle(mask: np.ndarray) -> dict:
    """Compressed RLE of a ``bool (H, W)`` mask with ``counts`` as str, as COCO JSON stores it."""
    rle = mask_util.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
