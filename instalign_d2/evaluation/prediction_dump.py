"""Predictions as COCO RLE, so that they can be scored again without the model.

A dump is one JSON file: the settings the predictions were made with and, per expression,
``image_id``, ``sent_id``, the no-target probability and decision and the binary predicted mask
(empty when no-target was predicted) as pycocotools RLE at the evaluation resolution; and the
expressions left out because the mapper could not read their image.
"""

import json
from typing import Dict, List, Sequence

import numpy as np
from pycocotools import mask as mask_util

from instalign_d2.utils.atomic_io import atomic_write_json

DUMP_FORMAT = "instalign_d2.gres_predictions"
DUMP_VERSION = 1


def encode_mask(mask: np.ndarray) -> Dict[str, object]:
    """A boolean (H, W) mask as compressed RLE with a JSON-friendly ``counts`` string."""
    rle = mask_util.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_mask(rle: Dict[str, object]) -> np.ndarray:
    """The boolean (H, W) mask of :func:`encode_mask`'s output."""
    counts = rle["counts"]
    counts = counts.encode("ascii") if isinstance(counts, str) else counts
    return mask_util.decode({"size": list(rle["size"]), "counts": counts}).astype(bool)


def prediction_record(
    image_id, sent_id, mask: np.ndarray, no_target_prob: float, pred_no_target: bool
) -> dict:
    return {
        "image_id": image_id,
        "sent_id": sent_id,
        "nt_prob": float(no_target_prob),
        "pred_no_target": bool(pred_no_target),
        "segmentation": encode_mask(mask),
    }


def write_dump(
    path: str,
    dataset_name: str,
    eval_resolution: str,
    mask_threshold: float,
    no_target_threshold: float,
    predictions: List[dict],
    skipped: Sequence[tuple] = (),
) -> str:
    return atomic_write_json(
        path,
        {
            "format": DUMP_FORMAT,
            "version": DUMP_VERSION,
            "dataset": dataset_name,
            "eval_resolution": eval_resolution,
            "mask_threshold": mask_threshold,
            "no_target_threshold": no_target_threshold,
            "predictions": predictions,
            "skipped": [{"image_id": i, "sent_id": s, "reason": r} for i, s, r in skipped],
        },
        indent=None,  # tens of thousands of records: keep the file compact
    )


def read_dump(path: str) -> dict:
    """Load a dump written by :func:`write_dump`; a clear error for anything else."""
    with open(path) as f:
        try:
            dump = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not a JSON prediction dump ({e})") from e
    if not isinstance(dump, dict) or dump.get("format") != DUMP_FORMAT:
        raise ValueError(
            f"{path} is not an instalign_d2 prediction dump (no format={DUMP_FORMAT!r}); "
            "write one with TEST.DUMP_PREDICTIONS True"
        )
    if dump.get("version") != DUMP_VERSION:
        raise ValueError(
            f"{path} is dump version {dump.get('version')}; this code reads version {DUMP_VERSION}"
        )
    return dump
