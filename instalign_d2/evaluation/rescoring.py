"""Score a saved prediction dump against dataset dicts, without the model or the images.

Ground-truth masks come from ``instalign_d2.data.masks.merged_mask``, the function the mapper
uses, so the numbers equal the ones :class:`GRESEvaluator` printed when it wrote the dump.
"""

from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from instalign_d2.data.masks import merged_mask

from .metrics import SampleResult
from .prediction_dump import decode_mask
from .report import SkippedSample
from .scoring import check_eval_resolution, sample_ids, score_sample

_MAX_LISTED = 5  # ids shown in an error about missing or extra predictions


def results_from_dump(
    dump: dict, dataset_dicts: Sequence[dict]
) -> Tuple[List[SampleResult], List[SkippedSample]]:
    """One :class:`SampleResult` per dataset expression, scored as the evaluator scores it, and
    the expressions the evaluator had skipped (unreadable images), as the dump lists them.

    Raises ``ValueError`` when the dump and the dataset do not cover the same expressions
    (a dump of another dataset or split) or a mask's size does not fit its image.
    """

    eval_resolution = check_eval_resolution(dump["eval_resolution"])
    predictions: Dict[Tuple[object, object], dict] = {}
    for p in dump["predictions"]:
        predictions[(p["image_id"], p["sent_id"])] = p
    skipped = [(s["image_id"], s["sent_id"], s["reason"]) for s in dump.get("skipped", [])]
    skipped_keys = {(s[0], s[1]) for s in skipped}
    keys = [sample_ids(d) for d in dataset_dicts]
    _check_same_expressions(
        dump.get("dataset"), [k for k in keys if k not in skipped_keys], predictions
    )

    results = []
    for d, key in zip(dataset_dicts, keys):
        if key in skipped_keys:
            continue
        prediction = predictions[key]
        pred = decode_mask(prediction["segmentation"])
        if eval_resolution == "input":
            # the mapper resizes to S x S; the dump's masks are at that size
            gt = merged_mask(d["annotations"], d["height"], d["width"], out_size=pred.shape)
            gt_key, pred_key = "gt_mask_merged", "ref_seg_input"
        else:
            if pred.shape != (d["height"], d["width"]):
                raise ValueError(
                    f"sample image_id={key[0]!r}, sent_id={key[1]!r}: the dump's mask is {pred.shape} but "
                    f"the image is ({d['height']}, {d['width']}); the dump was made with another dataset"
                )
            gt = merged_mask(d["annotations"], d["height"], d["width"])
            gt_key, pred_key = "gt_mask_merged_original", "ref_seg"
        inputs = {
            "image_id": key[0],
            "sentence": d["sentence"],
            "empty": bool(d.get("empty", not d["annotations"])),
            gt_key: torch.from_numpy(np.ascontiguousarray(gt)),
            "expression_kind": d.get("expression_kind"),
            "refzom_kind": d.get("refzom_kind"),
            "expression_template": d.get("expression_template"),
        }
        # the dump holds the binary decision: replay it as probabilities 0 / 1 through the scorer
        outputs = {
            pred_key: torch.from_numpy(pred.astype(np.float32)),
            "nt_prob": torch.tensor(1.0 if prediction["pred_no_target"] else 0.0),
        }
        results.append(score_sample(inputs, outputs, eval_resolution, 0.5, 0.5)[0])
    return results, skipped


def _check_same_expressions(dump_dataset, keys, predictions) -> None:
    wanted = set(keys)
    missing = [k for k in keys if k not in predictions]
    extra = [k for k in predictions if k not in wanted]
    if missing or extra:
        raise ValueError(
            f"the dump (of dataset {dump_dataset!r}) and the dataset disagree: {len(missing)} expressions "
            f"have no prediction (e.g. (image_id, sent_id) {missing[:_MAX_LISTED]}) and {len(extra)} "
            f"predictions are not in the dataset (e.g. {extra[:_MAX_LISTED]}); score a dump against the "
            "dataset it was made on"
        )
