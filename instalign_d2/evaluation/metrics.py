"""GRES metrics on per-expression records (I, U and flags), without masks or Detectron2 plumbing.

Three families, chosen by a dataset's ``evaluator_type``:

* ``"grefcoco"`` -- ReLA's evaluator (``gres_model/evaluation/refer_evaluation.py`` after its
  "fix eval metrics" commit): cIoU, gIoU, N-acc, T-acc, Pr@{0.7,0.8,0.9}, plus the same metrics
  per expression kind (single / multi / no-target) when the dataset dicts carry it.
* ``"refzom"`` -- DMMI's ``test.py``: oIoU, mIoU and Pr@{0.5..0.9} over the targeted
  (one-to-one, one-to-many) expressions, Acc over the one-to-zero ones, and the paper's Table 4
  break-down (oIoU / mIoU per one-to-one and one-to-many).
* ``"refcoco"`` -- classic RES: oIoU, mIoU, Pr@{0.5..0.9} over all expressions.

Every value is a percentage. A ratio whose denominator is zero (no expressions of that sort) is
reported as 0, as ReLA does for N-acc / T-acc; the counts reported beside the metrics tell such
a 0 apart from a real one.
"""

import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

EVALUATOR_TYPES = ("grefcoco", "refzom", "refcoco")
EXPRESSION_KINDS = ("single", "multi", "no_target")
REFZOM_KINDS = ("one_to_one", "one_to_many", "one_to_zero")
# A Ref-ZOM dict without ``refzom_kind`` (e.g. synthetic data scored the Ref-ZOM way) still has
# the generic kind, which names the same three cases (paper supp. §7.2).
REFZOM_KIND_OF_EXPRESSION_KIND = dict(zip(EXPRESSION_KINDS, REFZOM_KINDS))

GREFCOCO_PR_THRESHOLDS = (0.7, 0.8, 0.9)  # ReLA
RES_PR_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)  # DMMI / LAVT


@dataclass(frozen=True)
class SampleResult:
    """What the metrics need of one expression: I = |P ∩ G|, U = |P ∪ G| and the flags.

    ``pred_no_target`` is the no-target decision (``nt_prob`` above its threshold), after which
    the prediction P is the empty mask; ``pred_empty`` says whether P has no pixel at all, which
    is what DMMI's one-to-zero accuracy looks at.
    """

    image_id: object
    sent_id: object
    intersection: int
    union: int
    gt_empty: bool
    pred_no_target: bool
    pred_empty: bool
    expression_kind: Optional[str] = None
    refzom_kind: Optional[str] = None
    expression_template: Optional[str] = None  # the synthetic set records how it phrased each one

    @property
    def key(self) -> Tuple[object, object]:
        """Identity of the expression; a padded sampler may hand the same one to two processes."""
        return (self.image_id, self.sent_id)


def mask_intersection_union(pred: np.ndarray, gt: np.ndarray) -> Tuple[int, int]:
    """``(|pred ∩ gt|, |pred ∪ gt|)`` of two boolean masks of the same shape."""
    if pred.shape != gt.shape:
        raise ValueError(
            f"prediction {tuple(pred.shape)} and ground truth {tuple(gt.shape)} differ in shape"
        )
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    return int(np.logical_and(pred, gt).sum()), int(np.logical_or(pred, gt).sum())


def _percent(numerator: float, denominator: float) -> float:
    return 100.0 * numerator / denominator if denominator else 0.0


def _pr_name(threshold: float) -> str:
    return f"Pr@{threshold:.1f}"


def _iou(intersection: int, union: int) -> float:
    # Both public evaluators score U = 0 as IoU 0 (nothing predicted, nothing to find).
    return float(intersection) / float(union) if union else 0.0


def _mean_percent(values: Sequence[float]) -> float:
    # fsum is exact, so the mean does not depend on the order the processes delivered samples in.
    return 100.0 * math.fsum(values) / len(values) if values else 0.0


def _precision_at(ious: Sequence[float], thresholds: Iterable[float]) -> Dict[str, float]:
    return {_pr_name(t): _percent(sum(iou >= t for iou in ious), len(ious)) for t in thresholds}


# ----------------------------------------------------------------------------- gRefCOCO (ReLA)
def grefcoco_sample_scores(result: SampleResult) -> Tuple[float, int, int]:
    """``(IoU, I added to ΣI, U added to ΣU)`` of one expression under ReLA's rules."""
    if result.gt_empty:
        if result.pred_no_target:  # no-target found: a perfect sample that adds nothing to ΣI, ΣU
            return 1.0, 0, 0
        return 0.0, 0, result.union  # missed: the predicted area counts against cIoU
    # A target expression called no-target has I = 0; U keeps what was predicted (ReLA), which
    # for our outputs is just |G| because the no-target prediction is the empty mask.
    intersection = 0 if result.pred_no_target else result.intersection
    return _iou(intersection, result.union), intersection, result.union


def grefcoco_metrics(results: Sequence[SampleResult]) -> Dict[str, float]:
    """cIoU, gIoU, N_acc, T_acc and Pr@0.7/0.8/0.9 (percent) of ReLA's current evaluator.

    N-acc = no-target expressions predicted no-target / no-target expressions;
    T-acc = target expressions not predicted no-target / target expressions.
    """
    scores = [grefcoco_sample_scores(r) for r in results]
    target_ious = [iou for r, (iou, _, _) in zip(results, scores) if not r.gt_empty]
    no_target = [r for r in results if r.gt_empty]
    target = [r for r in results if not r.gt_empty]
    metrics = {
        "cIoU": _percent(sum(s[1] for s in scores), sum(s[2] for s in scores)),
        "gIoU": _mean_percent([s[0] for s in scores]),
        "N_acc": _percent(sum(r.pred_no_target for r in no_target), len(no_target)),
        "T_acc": _percent(sum(not r.pred_no_target for r in target), len(target)),
    }
    metrics.update(_precision_at(target_ious, GREFCOCO_PR_THRESHOLDS))
    return metrics


def grefcoco_kind_metrics(results: Sequence[SampleResult]) -> Dict[str, float]:
    """The gRefCOCO metrics per expression kind, as flat keys ``<metric>_<kind>``.

    Target kinds get cIoU, gIoU, T_acc and Pr@; the no-target kind gets gIoU and N_acc (its cIoU
    is 0 by construction, its T-acc and Pr@ have no samples). Kinds without samples are left out.
    """
    metrics: Dict[str, float] = {}
    for kind in EXPRESSION_KINDS:
        subset = [r for r in results if r.expression_kind == kind]
        if not subset:
            continue
        kind_metrics = grefcoco_metrics(subset)
        if kind == "no_target":
            names = ["gIoU", "N_acc"]
        else:
            names = ["cIoU", "gIoU", "T_acc"] + [_pr_name(t) for t in GREFCOCO_PR_THRESHOLDS]
        metrics.update({f"{name}_{kind}": kind_metrics[name] for name in names})
    return metrics


def grefcoco_template_metrics(results: Sequence[SampleResult]) -> Dict[str, float]:
    """gIoU, cIoU and the accuracy that applies (N-acc for no-target, T-acc otherwise) per
    expression template, as flat keys ``<metric>_template_<template>``; none when no template is
    recorded. Shows which phrasing a model has not learnt (e.g. spatial words)."""
    templates = sorted({r.expression_template for r in results} - {None})
    metrics: Dict[str, float] = {}
    for template in templates:
        subset = [r for r in results if r.expression_template == template]
        subset_metrics = grefcoco_metrics(subset)
        accuracy = "N_acc" if all(r.gt_empty for r in subset) else "T_acc"
        for name in ("gIoU", "cIoU", accuracy):
            metrics[f"{name}_template_{template}"] = subset_metrics[name]
    return metrics


def count_by_template(results: Sequence[SampleResult]) -> Dict[str, int]:
    """How many expressions of each template were scored (empty when none is recorded)."""
    counts: Dict[str, int] = {}
    for r in results:
        if r.expression_template is not None:
            counts[r.expression_template] = counts.get(r.expression_template, 0) + 1
    return dict(sorted(counts.items()))


# ----------------------------------------------------------------------------- Ref-ZOM (DMMI)
def _targeted_metrics(
    results: Sequence[SampleResult], thresholds: Sequence[float]
) -> Dict[str, float]:
    """oIoU = ΣI/ΣU, mIoU = mean IoU (0 when U = 0) and Pr@ over ``results``, as DMMI / LAVT."""
    ious = [_iou(r.intersection, r.union) for r in results]
    metrics = {
        "oIoU": _percent(sum(r.intersection for r in results), sum(r.union for r in results)),
        "mIoU": _mean_percent(ious),
    }
    metrics.update(_precision_at(ious, thresholds))
    return metrics


def refzom_kind(result: SampleResult) -> Optional[str]:
    """The Ref-ZOM case of an expression: its ``refzom_kind``, else mapped from its generic kind."""
    if result.refzom_kind is not None:
        return result.refzom_kind
    return REFZOM_KIND_OF_EXPRESSION_KIND.get(result.expression_kind)


def refzom_metrics(results: Sequence[SampleResult]) -> Dict[str, float]:
    """oIoU, mIoU, Acc, Pr@0.5..0.9 and the Table 4 break-down of DMMI's ``test.py`` (percent).

    One-to-zero (no-target) expressions enter only Acc: the share whose predicted mask is
    entirely empty -- a no-target prediction empties the mask, so it counts as right.
    """
    targeted = [r for r in results if not r.gt_empty]
    zero = [r for r in results if r.gt_empty]
    metrics = _targeted_metrics(targeted, RES_PR_THRESHOLDS)
    metrics["Acc"] = _percent(sum(r.pred_empty for r in zero), len(zero))
    for kind in ("one_to_one", "one_to_many"):
        subset = [r for r in targeted if refzom_kind(r) == kind]
        if subset:
            kind_metrics = _targeted_metrics(subset, ())
            metrics[f"oIoU_{kind}"] = kind_metrics["oIoU"]
            metrics[f"mIoU_{kind}"] = kind_metrics["mIoU"]
    return metrics


# ----------------------------------------------------------------------------- RefCOCO family
def refcoco_metrics(results: Sequence[SampleResult]) -> Dict[str, float]:
    """oIoU, mIoU and Pr@0.5..0.9 over every expression (classic RES; one target each)."""
    return _targeted_metrics(results, RES_PR_THRESHOLDS)


_FAMILY_METRICS = {
    "grefcoco": grefcoco_metrics,
    "refzom": refzom_metrics,
    "refcoco": refcoco_metrics,
}


def compute_metrics(evaluator_type: str, results: Sequence[SampleResult]) -> Dict[str, float]:
    """All metrics of one family (plus its per-kind break-down) as a flat ``{name: percent}``."""
    if evaluator_type not in _FAMILY_METRICS:
        raise ValueError(
            f"unknown evaluator_type {evaluator_type!r}; set the dataset's metadata "
            f"evaluator_type to one of {EVALUATOR_TYPES}"
        )
    metrics = _FAMILY_METRICS[evaluator_type](results)
    if evaluator_type == "grefcoco":
        metrics.update(grefcoco_kind_metrics(results))
        metrics.update(grefcoco_template_metrics(results))
    return metrics


def count_by_kind(results: Sequence[SampleResult], evaluator_type: str) -> Dict[str, int]:
    """How many expressions of each kind were scored (the kinds the family breaks down by)."""
    if evaluator_type == "refzom":
        kinds: List[Optional[str]] = [refzom_kind(r) for r in results]
    else:
        kinds = [r.expression_kind for r in results]
    counts: Dict[str, int] = {}
    for kind in kinds:
        if kind is not None:
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def dedupe(results: Iterable[SampleResult]) -> Tuple[List[SampleResult], int]:
    """Results sorted by expression and with repeats of an expression dropped, and how many.

    Sorting makes the outcome independent of how samples were spread over processes; a repeat
    comes from a sampler that pads its last batch, and the first (in sorted order) is kept.
    """
    ordered = sorted(results, key=_sort_key)
    unique: List[SampleResult] = []
    seen = set()
    for r in ordered:
        if r.key in seen:
            continue
        seen.add(r.key)
        unique.append(r)
    return unique, len(ordered) - len(unique)


def _sort_key(result: SampleResult):
    # ids may be ints or strings depending on the dataset; compare them as (type, value) pairs.
    return (
        type(result.image_id).__name__,
        result.image_id,
        type(result.sent_id).__name__,
        result.sent_id,
        result.intersection,
        result.union,
        result.pred_no_target,
    )
