"""Hand-computed cases for every metric and branch of the definitions (README, "Metrics"), and a naive-recompute property test."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from instalign_d2.evaluation.metrics import (
    SampleResult,
    compute_metrics,
    count_by_kind,
    dedupe,
    grefcoco_metrics,
    mask_intersection_union,
    refcoco_metrics,
    refzom_metrics,
)
from instalign_d2.evaluation.scoring import score_sample


def sample(
    sent_id,
    i,
    u,
    gt_empty=False,
    nt=False,
    pred_empty=None,
    kind=None,
    refzom_kind=None,
    image_id=1,
):
    """A record as the scorer makes it. ``pred_empty`` (read only for no-target expressions, where
    U is the predicted area) defaults to "no-target predicted or nothing predicted"."""
    if pred_empty is None:
        pred_empty = nt or (gt_empty and u == 0)
    return SampleResult(image_id, sent_id, i, u, gt_empty, nt, pred_empty, kind, refzom_kind)


# ----------------------------------------------------------------------------- gRefCOCO (ReLA)
GREFCOCO_CASES = [
    sample(1, 6, 8, kind="single"),  # target found: IoU 0.75
    sample(2, 9, 10, kind="multi"),  # target found: IoU 0.9 (exactly at Pr@0.9)
    sample(3, 0, 5, nt=True, kind="single"),  # FP no-target: I = 0, U = |G| = 5, IoU 0
    sample(
        4, 0, 0, kind="single"
    ),  # target that vanished at this resolution, nothing predicted: U = 0 -> IoU 0
    # TP no-target: IoU 1 and nothing added to ΣU, even with stray pixels behind the decision (U = 7)
    sample(5, 0, 7, gt_empty=True, nt=True, pred_empty=False, kind="no_target"),
    sample(
        6, 0, 4, gt_empty=True, kind="no_target"
    ),  # FN no-target with 4 predicted pixels: U = 4, IoU 0
    sample(
        7, 0, 0, gt_empty=True, pred_empty=True, kind="no_target"
    ),  # FN, empty mask: still IoU 0 (flag-based)
]


def test_grefcoco_every_branch():
    m = grefcoco_metrics(GREFCOCO_CASES)
    # ΣI = 6 + 9; ΣU = 8 + 10 + 5 + 0 + (0 for the TP) + 4 + 0
    assert m["cIoU"] == pytest.approx(100 * 15 / 27)
    assert m["gIoU"] == pytest.approx(100 * (0.75 + 0.9 + 1.0) / 7)
    assert m["N_acc"] == pytest.approx(100 * 1 / 3)  # one of three no-target expressions caught
    assert m["T_acc"] == pytest.approx(100 * 3 / 4)  # one of four targets wrongly called no-target
    assert m["Pr@0.7"] == pytest.approx(100 * 2 / 4)  # target IoUs 0.75, 0.9, 0, 0
    assert m["Pr@0.8"] == pytest.approx(100 * 1 / 4)
    assert m["Pr@0.9"] == pytest.approx(100 * 1 / 4)  # IoU exactly 0.9 counts (>=)


def test_grefcoco_per_kind_split():
    m = compute_metrics("grefcoco", GREFCOCO_CASES)
    assert m["cIoU_single"] == pytest.approx(100 * 6 / 13)
    assert m["gIoU_single"] == pytest.approx(100 * 0.75 / 3)
    assert m["T_acc_single"] == pytest.approx(100 * 2 / 3)
    assert m["Pr@0.7_single"] == pytest.approx(100 / 3)
    assert m["cIoU_multi"] == pytest.approx(90.0)
    assert m["Pr@0.9_multi"] == pytest.approx(100.0)
    assert m["gIoU_no_target"] == pytest.approx(100 / 3)
    assert m["N_acc_no_target"] == pytest.approx(100 / 3)
    # meaningless combinations are not reported
    assert "cIoU_no_target" not in m and "N_acc_single" not in m and "T_acc_no_target" not in m
    assert count_by_kind(GREFCOCO_CASES, "grefcoco") == {"single": 3, "multi": 1, "no_target": 3}


def test_grefcoco_without_kinds_has_no_split():
    m = compute_metrics("grefcoco", [sample(1, 6, 8)])
    assert not [k for k in m if k.endswith(("_single", "_multi", "_no_target"))]


def test_grefcoco_all_empty_predictions():
    results = [sample(1, 0, 12), sample(2, 0, 3), sample(3, 0, 0, gt_empty=True)]
    m = grefcoco_metrics(results)
    assert m["cIoU"] == 0.0 and m["gIoU"] == 0.0
    assert m["N_acc"] == 0.0  # an empty mask without the no-target decision is a miss
    assert m["T_acc"] == 100.0


def test_grefcoco_all_no_target_predictions():
    results = [
        sample(1, 0, 12, nt=True),
        sample(2, 0, 0, gt_empty=True, nt=True),
        sample(3, 0, 0, gt_empty=True, nt=True),
    ]
    m = grefcoco_metrics(results)
    assert m["gIoU"] == pytest.approx(100 * 2 / 3)
    assert m["cIoU"] == 0.0  # ΣI = 0 over ΣU = 12
    assert m["N_acc"] == 100.0 and m["T_acc"] == 0.0


def test_grefcoco_zero_denominators_are_zero_not_errors():
    only_caught_no_target = [sample(1, 0, 0, gt_empty=True, nt=True)]
    m = grefcoco_metrics(only_caught_no_target)  # ΣU = 0, no target expressions
    assert m["cIoU"] == 0.0 and m["T_acc"] == 0.0 and m["Pr@0.7"] == 0.0
    assert m["gIoU"] == 100.0 and m["N_acc"] == 100.0
    assert grefcoco_metrics([])["gIoU"] == 0.0


# ----------------------------------------------------------------------------- Ref-ZOM (DMMI)
REFZOM_CASES = [
    sample(1, 3, 4, refzom_kind="one_to_one"),  # IoU 0.75
    sample(2, 0, 0, refzom_kind="one_to_one"),  # U = 0 -> IoU 0
    sample(3, 8, 10, refzom_kind="one_to_many"),  # IoU 0.8 (exactly at Pr@0.8)
    sample(4, 0, 6, nt=True, refzom_kind="one_to_many"),  # called no-target: empty mask, IoU 0
    sample(5, 0, 0, gt_empty=True, nt=True, refzom_kind="one_to_zero"),  # right
    sample(
        6, 0, 1, gt_empty=True, pred_empty=False, refzom_kind="one_to_zero"
    ),  # one stray pixel: wrong
    sample(
        7, 0, 0, gt_empty=True, pred_empty=True, refzom_kind="one_to_zero"
    ),  # empty mask, no flag: right
]


def test_refzom_every_branch():
    m = refzom_metrics(REFZOM_CASES)
    assert m["oIoU"] == pytest.approx(100 * 11 / 20)  # one-to-zero expressions add nothing
    assert m["mIoU"] == pytest.approx(100 * (0.75 + 0.8) / 4)
    assert m["Acc"] == pytest.approx(100 * 2 / 3)
    assert m["Pr@0.5"] == m["Pr@0.6"] == m["Pr@0.7"] == pytest.approx(50.0)
    assert m["Pr@0.8"] == pytest.approx(25.0)
    assert m["Pr@0.9"] == 0.0
    # the paper's Table 4 break-down
    assert m["oIoU_one_to_one"] == pytest.approx(75.0)
    assert m["mIoU_one_to_one"] == pytest.approx(37.5)
    assert m["oIoU_one_to_many"] == pytest.approx(100 * 8 / 16)
    assert m["mIoU_one_to_many"] == pytest.approx(40.0)


def test_refzom_one_stray_pixel_differs_from_grefcoco():
    stray = [
        sample(1, 0, 1, gt_empty=True, pred_empty=False, refzom_kind="one_to_zero"),
        sample(2, 5, 5),
    ]
    assert refzom_metrics(stray)["Acc"] == 0.0
    assert refzom_metrics(stray)["oIoU"] == 100.0  # the stray pixel does not enter oIoU (DMMI)
    assert grefcoco_metrics(stray)["cIoU"] == pytest.approx(
        100 * 5 / 6
    )  # but it does enter cIoU (ReLA)


def test_refzom_kind_falls_back_to_expression_kind():
    results = [sample(1, 1, 2, kind="single"), sample(2, 3, 4, kind="multi")]
    m = refzom_metrics(results)
    assert m["oIoU_one_to_one"] == pytest.approx(50.0) and m["oIoU_one_to_many"] == pytest.approx(
        75.0
    )
    assert count_by_kind(results, "refzom") == {"one_to_one": 1, "one_to_many": 1}


def test_refzom_all_empty_predictions():
    results = [sample(1, 0, 9), sample(2, 0, 0, gt_empty=True, pred_empty=True)]
    m = refzom_metrics(results)
    assert m["oIoU"] == 0.0 and m["mIoU"] == 0.0 and m["Acc"] == 100.0


# ----------------------------------------------------------------------------- RefCOCO
def test_refcoco_metrics():
    m = refcoco_metrics([sample(1, 5, 10), sample(2, 9, 10), sample(3, 0, 0)])
    assert m["oIoU"] == pytest.approx(70.0)
    assert m["mIoU"] == pytest.approx(100 * 1.4 / 3)
    assert m["Pr@0.5"] == pytest.approx(200 / 3)
    assert m["Pr@0.6"] == m["Pr@0.9"] == pytest.approx(100 / 3)
    assert set(m) == {"oIoU", "mIoU", "Pr@0.5", "Pr@0.6", "Pr@0.7", "Pr@0.8", "Pr@0.9"}


def test_unknown_family_names_the_fix():
    with pytest.raises(ValueError, match="evaluator_type"):
        compute_metrics("coco", [])


def test_dedupe_is_order_independent_and_drops_repeats():
    a, b, c = sample(2, 1, 2), sample(1, 3, 4), sample(1, 0, 5, image_id=2)
    unique, dropped = dedupe([a, b, a, c])
    assert dropped == 1
    assert unique == dedupe([c, a, b])[0] == [b, a, c]


def test_mask_intersection_union():
    p = np.array([[1, 1, 0], [0, 1, 0]], bool)
    g = np.array([[0, 1, 1], [0, 1, 0]], bool)
    assert mask_intersection_union(p, g) == (2, 4)
    with pytest.raises(ValueError, match="shape"):
        mask_intersection_union(p, g[:, :2])


# ----------------------------------------------------------------------------- property test
def naive_counts(pred, gt):
    inter = union = 0
    for p_row, g_row in zip(pred.tolist(), gt.tolist()):
        for p, g in zip(p_row, g_row):
            inter += p and g
            union += p or g
    return inter, union


sample_strategy = st.tuples(
    arrays(np.bool_, (5, 7)),  # predicted mask
    arrays(np.bool_, (5, 7)),  # ground truth (ignored for no-target expressions)
    st.booleans(),  # ground truth is no-target
    st.booleans(),  # model says no-target
)


@settings(max_examples=60, deadline=None)
@given(st.lists(sample_strategy, min_size=1, max_size=12))
def test_metrics_equal_naive_recompute(samples):
    results, ious, cum_i, cum_u, ref_ious, ref_i, ref_u, zero_right = [], [], 0, 0, [], 0, 0, []
    for n, (pred, gt, gt_empty, says_nt) in enumerate(samples):
        gt = np.zeros_like(gt) if gt_empty else gt
        inputs = {
            "image_id": 7,
            "sentence": {"sent_id": n},
            "empty": gt_empty,
            "gt_mask_merged": torch.from_numpy(gt),
        }
        outputs = {
            "ref_seg_input": torch.from_numpy(pred).float() * 0.9,
            "nt_prob": torch.tensor(0.8 if says_nt else 0.2),
        }
        results.append(score_sample(inputs, outputs)[0])
        # the definitions, written out per expression (README, "Metrics")
        shown = np.zeros_like(pred) if says_nt else pred
        i, u = naive_counts(shown, gt)
        if gt_empty:
            ious.append(1.0 if says_nt else 0.0)
            cum_u += 0 if says_nt else u
            zero_right.append(not shown.any())
        else:
            ious.append(i / u if u else 0.0)
            cum_i, cum_u = cum_i + i, cum_u + u
            ref_ious.append(i / u if u else 0.0)
            ref_i, ref_u = ref_i + i, ref_u + u
    g = grefcoco_metrics(results)
    assert g["cIoU"] == pytest.approx(100 * cum_i / cum_u if cum_u else 0.0)
    assert g["gIoU"] == pytest.approx(100 * sum(ious) / len(ious))
    z = refzom_metrics(results)
    assert z["oIoU"] == pytest.approx(100 * ref_i / ref_u if ref_u else 0.0)
    assert z["mIoU"] == pytest.approx(100 * sum(ref_ious) / len(ref_ious) if ref_ious else 0.0)
    assert z["Acc"] == pytest.approx(100 * sum(zero_right) / len(zero_right) if zero_right else 0.0)
    assert not any(math.isnan(v) for v in list(g.values()) + list(z.values()))
