"""Turn one (mapper input, model output) pair into a :class:`SampleResult`, checking both.

The contracts are docs/interfaces.md §2-3: the prediction is ``ref_seg_input > threshold``
compared with ``gt_mask_merged`` (the mapper's resolution, as ReLA and DMMI evaluate), or
``ref_seg`` with ``gt_mask_merged_original`` at the original image size; ``nt_prob`` above its
threshold means no target, and the prediction is then the empty mask.
"""

from typing import Optional, Tuple

import numpy as np
import torch

from .metrics import SampleResult

EVAL_RESOLUTIONS = ("input", "original")
# (model output key, mapper key) compared at each evaluation resolution
_MASK_KEYS = {
    "input": ("ref_seg_input", "gt_mask_merged"),
    "original": ("ref_seg", "gt_mask_merged_original"),
}


def check_eval_resolution(eval_resolution: str) -> str:
    if eval_resolution not in EVAL_RESOLUTIONS:
        raise ValueError(
            f"TEST.EVAL_RESOLUTION is {eval_resolution!r}; use one of {EVAL_RESOLUTIONS} "
            "('input' = the mapper's resolution, as the public evaluators)"
        )
    return eval_resolution


def sample_ids(inputs: dict) -> Tuple[object, object]:
    """``(image_id, sent_id)`` of a mapper output, the names errors and dedupe use."""
    sentence = inputs.get("sentence")
    if not isinstance(sentence, dict) or "sent_id" not in sentence:
        raise ValueError(
            f"evaluator input of image_id={inputs.get('image_id')!r} has no sentence['sent_id']; "
            "the GRES test mapper copies 'sentence' from the dataset dict (docs/interfaces.md §2)"
        )
    return _plain_id(inputs.get("image_id")), _plain_id(sentence["sent_id"])


def _plain_id(value):
    # numpy / torch scalars (e.g. after a collate) would not survive the JSON files.
    return value.item() if hasattr(value, "item") else value


class SampleError(ValueError):
    """A model output or mapper input that cannot be scored; the message names the sample."""


def score_sample(
    inputs: dict,
    outputs: dict,
    eval_resolution: str = "input",
    mask_threshold: float = 0.5,
    no_target_threshold: float = 0.5,
) -> Tuple[SampleResult, np.ndarray, float]:
    """Score one expression: ``(result, predicted boolean mask, no-target probability)``.

    The mask is returned for the optional prediction dump; callers keep only the result.
    """
    image_id, sent_id = sample_ids(inputs)
    where = f"image_id={image_id!r}, sent_id={sent_id!r}"

    def fail(message: str) -> SampleError:
        return SampleError(f"sample {where}: {message}")

    pred_key, gt_key = _MASK_KEYS[eval_resolution]
    if gt_key not in inputs:
        hint = (
            " (the test mapper adds it only when TEST.EVAL_RESOLUTION is 'original': build mapper "
            "and evaluator from the same config)"
            if eval_resolution == "original"
            else ""
        )
        raise fail(f"the mapper input has no {gt_key!r}{hint}")
    if "empty" not in inputs:
        raise fail("the mapper input has no 'empty' flag (copied from the dataset dict)")
    for key in (pred_key, "nt_prob"):
        if key not in outputs:
            raise fail(
                f"the model output has no {key!r} (docs/interfaces.md §3); it has {sorted(outputs)}"
            )

    no_target_prob = _scalar_probability(outputs["nt_prob"], fail)
    gt = torch.as_tensor(inputs[gt_key]).to(device="cpu", dtype=torch.bool)
    prob = outputs[pred_key]
    if not isinstance(prob, (torch.Tensor, np.ndarray)):
        raise fail(
            f"outputs[{pred_key!r}] is a {type(prob).__name__}, expected a float mask tensor"
        )
    prob = torch.as_tensor(prob)
    if tuple(prob.shape) != tuple(gt.shape):
        raise fail(
            f"outputs[{pred_key!r}] has shape {tuple(prob.shape)} but inputs[{gt_key!r}] has shape "
            f"{tuple(gt.shape)}; the model must return the mask at that resolution"
        )
    if not prob.is_floating_point():
        prob = prob.float()  # a 0/1 mask (e.g. a re-scored dump) thresholds the same way
    if bool(torch.isnan(prob).any()):
        raise fail(f"outputs[{pred_key!r}] contains NaN probabilities")

    pred_no_target = no_target_prob > no_target_threshold
    if pred_no_target:
        pred = torch.zeros_like(gt)
    else:
        pred = (prob > mask_threshold).to("cpu")
    intersection = int(torch.logical_and(pred, gt).sum())
    union = int(torch.logical_or(pred, gt).sum())
    result = SampleResult(
        image_id=image_id,
        sent_id=sent_id,
        intersection=intersection,
        union=union,
        gt_empty=bool(inputs["empty"]),
        pred_no_target=bool(pred_no_target),
        pred_empty=not bool(pred.any()),
        expression_kind=_optional_str(inputs.get("expression_kind")),
        refzom_kind=_optional_str(inputs.get("refzom_kind")),
        expression_template=_optional_str(inputs.get("expression_template")),
    )
    return result, pred.numpy(), no_target_prob


def _scalar_probability(value, fail) -> float:
    numel = value.numel() if isinstance(value, torch.Tensor) else np.size(value)
    if numel != 1:
        raise fail(f"outputs['nt_prob'] must be one probability, got {numel} values")
    prob = float(value.item() if hasattr(value, "item") else value)
    if not np.isfinite(prob):
        raise fail(f"outputs['nt_prob'] is {prob}, not a probability")
    return prob


def _optional_str(value) -> Optional[str]:
    return None if value is None else str(value)
