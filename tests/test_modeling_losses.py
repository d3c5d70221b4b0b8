"""POA (Eq. 1-3), matcher (Eq. 5-6), criterion (Eq. 7, 9, 13), AIA (Eq. 8) and the no-target head (Eq. 10-12)."""

import itertools
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from instalign_d2.modeling.aggregation import (
    EMPTY_MASK_LOGIT,
    InstanceAggregation,
    NoTargetHead,
    aggregate_instances,
    sentence_feature,
)
from instalign_d2.modeling.criterion import (
    InstAlignCriterion,
    bce_dice_loss,
    phrase_alignment_loss,
    phrase_token_weights,
)
from instalign_d2.modeling.loss_settings import PAPER_LOSS_WEIGHTS, LossWeights, PointSampling
from instalign_d2.modeling.matcher import PhraseAwareHungarianMatcher

# ----------------------------------------------------------------------------- POA, Eq. 1-3


def test_phrase_alignment_matches_hand_computation_and_ignores_padding():
    queries = torch.tensor([[[1.0, 0.0]]])  # B=1, N=1, C=2
    text = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])  # last token is padding
    pad = torch.tensor([[False, False, True]])

    # By hand: affinities [1/sqrt(2), 0] over the two valid tokens.
    a = math.exp(1 / math.sqrt(2))
    r = [a / (a + 1), 1 / (a + 1)]
    phrase = [r[0], r[1]]  # P = R T
    cos = phrase[0] / math.hypot(*phrase)

    weights = phrase_token_weights(queries, text, pad)
    assert weights[0, 0].tolist() == pytest.approx([r[0], r[1], 0.0], abs=1e-6)
    loss = phrase_alignment_loss(queries, text, pad)
    assert loss.shape == (1, 1)
    assert loss.item() == pytest.approx(1 - cos, abs=1e-6)

    # Padding features never matter.
    text_other_pad = text.clone()
    text_other_pad[0, 2] = torch.tensor([-30.0, 7.0])
    assert phrase_alignment_loss(queries, text_other_pad, pad).item() == pytest.approx(
        loss.item(), abs=1e-7
    )
    # ...while without the mask the padding token dominates and the loss changes.
    assert phrase_alignment_loss(queries, text, torch.zeros_like(pad)).item() != pytest.approx(
        loss.item(), abs=1e-3
    )


def test_phrase_alignment_is_zero_for_a_query_equal_to_its_only_token_and_batched():
    torch.manual_seed(0)
    text = torch.randn(2, 4, 8)
    pad = torch.tensor([[False, True, True, True], [False, False, False, True]])
    queries = text[:, :1].repeat(1, 3, 1)  # image 0: each query equals the single valid token
    loss = phrase_alignment_loss(queries, text, pad)
    assert loss.shape == (2, 3)
    assert torch.allclose(loss[0], torch.zeros(3), atol=1e-6)
    assert ((loss >= -1e-6) & (loss <= 2 + 1e-6)).all()


def test_phrase_alignment_rejects_an_attention_mask():
    q, t = torch.randn(1, 2, 4), torch.randn(1, 3, 4)
    with pytest.raises(TypeError, match="attention_mask == 0"):
        phrase_alignment_loss(q, t, torch.ones(1, 3, dtype=torch.long))


# ----------------------------------------------------------------------------- AIA, Eq. 8


def test_aggregate_instances_by_hand():
    mask_logits = torch.tensor([[[[2.0, -4.0]], [[-1.0, 3.0]]]])  # B=1, N=2, H=1, W=2
    scores = torch.tensor([[0.5, 1.0]])
    prelu = torch.nn.PReLU(init=0.25)
    # PReLU: [2, -1] and [-0.25, 3]; weighted sum: 0.5*[2, -1] + 1*[-0.25, 3]
    merged = aggregate_instances(mask_logits, scores, prelu)
    assert merged.shape == (1, 1, 2)
    assert merged.flatten().tolist() == pytest.approx([0.75, 2.5])
    # Without PReLU: 0.5*[2, -4] + [-1, 3]
    assert aggregate_instances(mask_logits, scores, None).flatten().tolist() == pytest.approx(
        [0.0, 1.0]
    )


def test_instance_aggregation_modes_and_gradients():
    mask_logits = torch.tensor([[[[2.0, -4.0]], [[-1.0, 3.0]]]], requires_grad=True)
    relevance = torch.logit(torch.tensor([[0.5, 0.7]])).requires_grad_()

    aia = InstanceAggregation(mode="AIA", prelu_init=0.25)
    merged = aia(mask_logits, relevance)
    expected = 0.5 * torch.tensor([2.0, -1.0]) + 0.7 * torch.tensor([-0.25, 3.0])
    assert torch.allclose(merged.flatten(), expected, atol=1e-6)
    merged.sum().backward()
    assert aia.prelu.weight.grad is not None and aia.prelu.weight.grad.abs().item() > 0
    assert relevance.grad.abs().min() > 0

    no_prelu = InstanceAggregation(mode="AIA_NO_PRELU")
    assert no_prelu.prelu is None
    assert torch.allclose(
        no_prelu(mask_logits, relevance).flatten(),
        0.5 * torch.tensor([2.0, -4.0]) + 0.7 * torch.tensor([-1.0, 3.0]),
    )

    # Threshold 0.6 keeps only the second instance; 0.8 keeps none -> the empty logit everywhere.
    assert InstanceAggregation(mode="THRESHOLD", threshold=0.6)(
        mask_logits, relevance
    ).flatten().tolist() == [-1.0, 3.0]
    assert (
        InstanceAggregation(mode="THRESHOLD", threshold=0.8)(mask_logits, relevance)
        .flatten()
        .tolist()
        == [EMPTY_MASK_LOGIT] * 2
    )
    # Two selected: the union (pixel-wise max of logits).
    both = InstanceAggregation(mode="THRESHOLD", threshold=0.4)(mask_logits, relevance)
    assert both.flatten().tolist() == [2.0, 3.0]

    with pytest.raises(ValueError, match="AGGREGATION"):
        InstanceAggregation(mode="MEAN")


# ----------------------------------------------------------------------------- no-target head, Eq. 10-12


def _nt_inputs():
    queries = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    relevance = torch.logit(torch.tensor([[0.5, 0.75]]))
    text = torch.tensor([[[1.0, 1.0], [3.0, 5.0], [100.0, 100.0]]])
    pad = torch.tensor([[False, False, True]])
    return queries, relevance, text, pad


def test_no_target_head_inputs_by_hand():
    queries, relevance, text, pad = _nt_inputs()
    q_global = [0.5 * 1 + 0.75 * 3, 0.5 * 2 + 0.75 * 4]  # Eq. 10
    t_sen = [2.0, 3.0]  # mean of the two valid tokens
    assert sentence_feature(text, pad).flatten().tolist() == pytest.approx(t_sen)
    expected = {
        "QGLOBAL_TSEN": q_global + t_sen,  # Eq. 11
        "QGLOBAL": q_global,
        "TSEN": t_sen,
        "MEAN_QUERIES": [2.0, 3.0],
    }
    for mode, values in expected.items():
        head = NoTargetHead(hidden_dim=2, input_mode=mode)
        assert head.features(queries, relevance, text, pad).flatten().tolist() == pytest.approx(
            values
        ), mode
        logit = head(queries, relevance, text, pad)
        assert logit.shape == (1,)
        assert torch.allclose(
            logit, head.mlp(head.features(queries, relevance, text, pad)).squeeze(-1)
        )
    with pytest.raises(ValueError, match="NO_TARGET_INPUT"):
        NoTargetHead(hidden_dim=2, input_mode="CLS")


def test_no_target_head_gradient_reaches_relevance_scores():
    queries, relevance, text, pad = _nt_inputs()
    relevance.requires_grad_()
    head = NoTargetHead(hidden_dim=2)
    with torch.no_grad():  # all inputs are positive: positive weights keep every ReLU unit active
        head.mlp[0].weight.fill_(0.1)
        head.mlp[0].bias.zero_()
    head(queries, relevance, text, pad).sum().backward()
    assert relevance.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- matcher, Eq. 5-6


def test_matcher_cost_by_hand_on_constant_masks():
    matcher = PhraseAwareHungarianMatcher(weights=PAPER_LOSS_WEIGHTS, num_points=50)
    relevance = torch.tensor([[0.0, 2.0]])
    # Logits 0 (p = 0.5) everywhere and an empty instance: every sampled point reads exactly that,
    # even beyond the last pixel centre, where point_sample blends with the zero padding.
    mask_logits = torch.zeros(1, 2, 4, 4)
    gt = torch.zeros(1, 8, 8, dtype=torch.bool)
    phrase = torch.tensor([[0.3, 0.0]])
    (cost,) = matcher.batched_cost_matrices(relevance, mask_logits, [gt], phrase)
    points = 50
    bce = math.log(2.0)
    dice = 1 - 1 / (0.5 * points + 1)
    expected = [
        2 * math.log(2.0) + 5 * (bce + dice) + 0.3,
        2 * math.log1p(math.exp(-2.0)) + 5 * (bce + dice) + 0.0,
    ]
    assert cost.flatten().tolist() == pytest.approx(expected, abs=1e-5)


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_matcher_assignment_is_the_brute_force_optimum_of_hand_written_costs():
    """Eq. 5-6 through the matcher's public call: constant-logit predictions against full and
    empty instances have costs in closed form; the best assignment over all permutations of
    those hand-written costs is the one the matcher must return."""
    relevance = [2.0, -1.0, 0.5, -2.0, 1.0]
    logits = [3.0, -3.0, 2.0, 0.5, -2.0]  # each prediction's mask logit, the same at every pixel
    phrase = [0.2, 0.9, 0.1, 0.5, 0.3]
    full = [True, False, True]  # instance j covers the whole image, or nothing
    points, size = 2000, 256  # fine masks: the padding-blended border band is ~1 % of the points

    def mask_cost(c: float, is_full: bool) -> float:  # (BCE + Dice) of a constant prediction
        p = 1 / (1 + math.exp(-c))
        if is_full:
            return _softplus(-c) + 1 - (2 * p * points + 1) / (p * points + points + 1)
        return _softplus(c) + 1 - 1 / (p * points + 1)

    cost = [
        [2 * _softplus(-r) + 5 * mask_cost(c, f) + 1 * ph for f in full]  # Eq. 6
        for r, c, ph in zip(relevance, logits, phrase)
    ]
    totals = {
        assignment: sum(cost[q][j] for j, q in enumerate(assignment))
        for assignment in itertools.permutations(range(5), 3)
    }
    best = min(totals, key=totals.get)
    # The two full instances are interchangeable; any other choice must cost clearly more than the
    # approximation of the border band could account for.
    same = {a for a in totals if a[1] == best[1] and {a[0], a[2]} == {best[0], best[2]}}
    runner_up = min(v for a, v in totals.items() if a not in same)
    assert runner_up - totals[best] > 0.5

    masks = torch.stack([torch.full((size, size), f) for f in full])
    mask_logits = torch.tensor(logits)[:, None, None].expand(5, size, size)
    matcher = PhraseAwareHungarianMatcher(weights=PAPER_LOSS_WEIGHTS, num_points=points)
    torch.manual_seed(0)
    ((rows, cols),) = matcher(
        torch.tensor([relevance]), mask_logits[None], [masks], torch.tensor([phrase])
    )
    assignment = dict(zip(cols.tolist(), rows.tolist()))  # instance -> prediction
    assert assignment[1] == best[1]
    assert {assignment[0], assignment[2]} == {best[0], best[2]}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matcher_is_optimal_against_brute_force(seed):
    torch.manual_seed(seed)
    num_queries, num_gt = 5, 3
    matcher = PhraseAwareHungarianMatcher(num_points=64)
    relevance = torch.randn(1, num_queries)
    mask_logits = torch.randn(1, num_queries, 8, 8) * 3
    gt = torch.rand(1, num_gt, 16, 16) > 0.5
    phrase = torch.rand(1, num_queries)

    torch.manual_seed(100)
    ((rows, cols),) = matcher(relevance, mask_logits, [gt[0]], phrase)
    torch.manual_seed(100)  # the same sampled points
    (cost,) = matcher.batched_cost_matrices(relevance, mask_logits, [gt[0]], phrase)

    assert sorted(cols.tolist()) == list(range(num_gt)) and len(set(rows.tolist())) == num_gt
    best = min(
        sum(cost[q, j].item() for j, q in enumerate(assignment))
        for assignment in itertools.permutations(range(num_queries), num_gt)
    )
    assert cost[rows, cols].sum().item() == pytest.approx(best, abs=1e-5)


def test_matcher_phrase_term_changes_the_assignment():
    # Two identical predictions; only the phrase cost tells which one should take the instance.
    relevance = torch.zeros(1, 2)
    mask_logits = torch.zeros(1, 2, 4, 4)
    gt = [torch.ones(1, 4, 4, dtype=torch.bool)]
    phrase = torch.tensor([[0.9, 0.1]])
    ((rows, _),) = PhraseAwareHungarianMatcher(weights=PAPER_LOSS_WEIGHTS)(
        relevance, mask_logits, gt, phrase
    )
    assert rows.tolist() == [1]
    phrase_swapped = torch.tensor([[0.1, 0.9]])
    ((rows, _),) = PhraseAwareHungarianMatcher(weights=PAPER_LOSS_WEIGHTS)(
        relevance, mask_logits, gt, phrase_swapped
    )
    assert rows.tolist() == [0]


def test_matcher_handles_no_target_and_batches():
    torch.manual_seed(0)
    matcher = PhraseAwareHungarianMatcher(num_points=32)
    gts = [torch.zeros(0, 8, 8, dtype=torch.bool), torch.rand(2, 8, 8) > 0.5]
    matches = matcher(torch.randn(2, 4), torch.randn(2, 4, 4, 4), gts, torch.rand(2, 4))
    assert matches[0][0].numel() == 0 and matches[0][1].numel() == 0
    assert matches[0][0].dtype == torch.int64
    assert len(matches[1][0]) == 2 and sorted(matches[1][1].tolist()) == [0, 1]


def test_matcher_rejects_nan_predictions():
    matcher = PhraseAwareHungarianMatcher(num_points=16)
    with pytest.raises(FloatingPointError, match="NaN"):
        matcher(
            torch.full((1, 2), float("nan")),
            torch.zeros(1, 2, 4, 4),
            [torch.ones(1, 4, 4, dtype=torch.bool)],
        )


def test_matcher_from_config_drops_phrase_cost_for_standard_supervision(cfg_factory):
    cfg = cfg_factory()
    assert PhraseAwareHungarianMatcher(cfg).weights.phrase == 1.0
    cfg.MODEL.INSTALIGN.INSTANCE_SUPERVISION = "standard"
    assert PhraseAwareHungarianMatcher(cfg).weights.phrase == 0.0
    criterion = InstAlignCriterion(cfg)
    assert criterion.matcher.weights == criterion.weights  # one set of lambdas for Eq. 6 and 7


# ----------------------------------------------------------------------------- criterion, Eq. 7, 9, 13


@pytest.fixture
def cfg_factory():
    from detectron2.config import get_cfg

    from instalign_d2.config import add_instalign_config

    def make():
        return add_instalign_config(get_cfg())

    return make


def _criterion(**kwargs):
    weights = kwargs.pop("weights", PAPER_LOSS_WEIGHTS)
    if kwargs.get("instance_supervision") == "standard":
        weights = replace(weights, phrase=0.0)
    matcher = PhraseAwareHungarianMatcher(weights=weights, num_points=64)
    return InstAlignCriterion(
        matcher=matcher, weights=weights, points=PointSampling(num_points=64), **kwargs
    )


def _outputs(batch=2, queries=4, levels=3, size=8, tokens=5, dim=8, requires_grad=False):
    torch.manual_seed(0)
    predictions = []
    for _ in range(levels):
        predictions.append(
            {
                "relevance_logits": torch.randn(batch, queries, requires_grad=requires_grad),
                "mask_logits": torch.randn(batch, queries, size, size, requires_grad=requires_grad),
                "queries": torch.randn(batch, queries, dim, requires_grad=requires_grad),
                "text": torch.randn(batch, tokens, dim),
                "merged_logits": torch.randn(batch, size, size, requires_grad=requires_grad),
            }
        )
    pad = torch.zeros(batch, tokens, dtype=torch.bool)
    pad[:, 3:] = True
    return {
        "predictions": predictions,
        "text_pad_mask": pad,
        "no_target_logits": torch.randn(batch, requires_grad=requires_grad),
    }


def _single_prediction_outputs(
    relevance, mask_logits, queries, text, pad, merged_logits, no_target_logits
):
    """The criterion's input when the decoder made one prediction (no deep supervision)."""
    prediction = {
        "relevance_logits": relevance,
        "mask_logits": mask_logits,
        "queries": queries,
        "text": text,
        "merged_logits": merged_logits,
    }
    return {
        "predictions": [prediction],
        "text_pad_mask": pad,
        "no_target_logits": no_target_logits,
    }


def _targets(instances_per_image, size=32):
    targets = []
    for count in instances_per_image:
        masks = torch.zeros(count, size, size, dtype=torch.bool)
        for j in range(count):
            masks[j, 4 * j : 4 * j + 8, 2:12] = True
        targets.append({"masks": masks, "merged_mask": masks.any(0), "empty": count == 0})
    return targets


def test_bce_dice_loss_by_hand():
    logits = torch.zeros(1, 4)
    targets = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    dice = 1 - (2 * 0.5 * 2 + 1) / (0.5 * 4 + 2 + 1)
    assert bce_dice_loss(logits, targets).item() == pytest.approx(math.log(2) + dice)


def test_criterion_keys_sum_and_deep_supervision():
    outputs = _outputs(levels=3, requires_grad=True)
    losses = _criterion()(outputs, _targets([2, 1]))
    expected = {"loss_no_target"}
    for suffix in ("_0", "_1", ""):
        expected |= {f"loss_{name}{suffix}" for name in ("merged", "score", "mask", "phrase")}
    assert set(losses) == expected
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    for prediction in outputs["predictions"]:
        assert prediction["mask_logits"].grad.abs().sum() > 0
        assert prediction["queries"].grad.abs().sum() > 0  # through the phrase loss
    assert outputs["no_target_logits"].grad.abs().sum() > 0

    last_only = _criterion(deep_supervision=False)(_outputs(levels=3), _targets([2, 1]))
    assert set(last_only) == {
        "loss_merged",
        "loss_score",
        "loss_mask",
        "loss_phrase",
        "loss_no_target",
    }


def test_merged_loss_on_the_last_prediction_only():
    criterion = _criterion(merged_loss_on_last_only=True)
    assert not criterion.merged_loss_on_every_prediction
    assert _criterion().merged_loss_on_every_prediction
    assert not _criterion(deep_supervision=False).merged_loss_on_every_prediction

    outputs = _outputs(levels=3, requires_grad=True)
    losses = criterion(outputs, _targets([2, 1]))
    expected = {"loss_merged", "loss_no_target"}
    for suffix in ("_0", "_1", ""):
        expected |= {f"loss_{name}{suffix}" for name in ("score", "mask", "phrase")}
    assert set(losses) == expected  # L_inst on every prediction, L_merged on the last only
    default = _criterion()(_outputs(levels=3), _targets([2, 1]))
    assert losses["loss_merged"].item() == pytest.approx(default["loss_merged"].item())
    sum(losses.values()).backward()
    for prediction in outputs["predictions"][:-1]:  # earlier merged logits get no gradient
        assert prediction["merged_logits"].grad is None
        assert prediction["mask_logits"].grad.abs().sum() > 0  # but their L_inst does
    assert outputs["predictions"][-1]["merged_logits"].grad.abs().sum() > 0


@pytest.mark.parametrize("instances", [1, 2])
@pytest.mark.parametrize("normalization", ["num_instances", "mean_over_queries"])
def test_eq7_written_out_by_hand(monkeypatch, instances, normalization):
    """Two expressions, three queries: the first refers to ``instances`` objects, matched to
    queries 1 (and 2) by force; the second refers to nothing. Eq. 7 by hand, term by term."""
    size, l_score, l_mask, l_phrase = 8, 2.0, 5.0, 1.0
    torch.manual_seed(0)
    relevance = torch.tensor([[1.5, -0.5, 0.3], [-1.0, 0.2, -2.0]])
    mask_logits = torch.randn(2, 3, size, size) * 2
    queries, text = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    pad = torch.tensor([[False, False, False, True, True], [False] * 4 + [True]])
    gt = torch.zeros(instances, size, size, dtype=torch.bool)
    gt[0, :, :4] = True
    if instances == 2:
        gt[1, 5:, 5:] = True
    targets = [
        {"masks": gt, "merged_mask": gt.any(0), "empty": False},
        {
            "masks": torch.zeros(0, size, size, dtype=torch.bool),
            "merged_mask": torch.zeros(size, size, dtype=torch.bool),
            "empty": True,
        },
    ]
    outputs = _single_prediction_outputs(
        relevance, mask_logits, queries, text, pad, torch.zeros(2, size, size), torch.zeros(2)
    )
    criterion = _criterion(
        weights=replace(PAPER_LOSS_WEIGHTS, score=l_score, mask=l_mask, phrase=l_phrase),
        score_normalization=normalization,
    )
    matched = [1, 2][:instances]  # omega*: instance i -> query matched[i]
    forced = [
        (torch.tensor(matched), torch.arange(instances)),
        (torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)),
    ]
    monkeypatch.setattr(criterion.matcher, "forward", lambda *args: forced)
    # Dense L_mask, at the logits' resolution: the same per-instance loss, without random points.
    monkeypatch.setattr(
        criterion,
        "point_sampled_mask_loss",
        lambda logits, masks: bce_dice_loss(logits.flatten(1), masks.flatten(1).float()),
    )
    losses = criterion(outputs, targets)

    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731  BCE(p, 1) = sp(-x), BCE(p, 0) = sp(x)
    phrase = phrase_alignment_loss(queries, text, pad)
    score_matched = sum(l_score * sp(-relevance[0, q].item()) for q in matched)
    unmatched = [(0, q) for q in range(3) if q not in matched] + [(1, q) for q in range(3)]
    score_unmatched = sum(sp(relevance[b, q].item()) for b, q in unmatched)
    mask = sum(
        l_mask
        * bce_dice_loss(mask_logits[0, q].flatten()[None], gt[i].flatten()[None].float()).item()
        for i, q in enumerate(matched)
    )
    phrase_sum = sum(l_phrase * phrase[0, q].item() for q in matched)
    eq7 = score_matched + score_unmatched + mask + phrase_sum  # Eq. 7 of the batch

    assert losses["loss_mask"].item() == pytest.approx(mask / instances, rel=1e-5)
    assert losses["loss_phrase"].item() == pytest.approx(phrase_sum / instances, rel=1e-5)
    if normalization == "num_instances":  # every term over one normaliser: Eq. 7 / instances
        assert losses["loss_score"].item() == pytest.approx(
            (score_matched + score_unmatched) / instances, rel=1e-5
        )
        total = losses["loss_score"] + losses["loss_mask"] + losses["loss_phrase"]
        assert total.item() == pytest.approx(eq7 / instances, rel=1e-5)
    else:  # score terms: weighted mean over the 6 queries, weights l_score (matched) and 1
        weight = l_score * instances + len(unmatched)
        assert losses["loss_score"].item() == pytest.approx(
            (score_matched + score_unmatched) / weight, rel=1e-5
        )


def test_criterion_rejects_an_unknown_score_normalization():
    with pytest.raises(ValueError, match="SCORE_LOSS_NORMALIZATION"):
        _criterion(score_normalization="mean")


def test_criterion_supervision_switches():
    standard = _criterion(instance_supervision="standard", deep_supervision=False)(
        _outputs(), _targets([1, 1])
    )
    assert set(standard) == {"loss_merged", "loss_score", "loss_mask", "loss_no_target"}
    none = _criterion(instance_supervision="none")(_outputs(levels=2), _targets([1, 1]))
    assert set(none) == {"loss_merged_0", "loss_merged", "loss_no_target"}
    with pytest.raises(ValueError, match="INSTANCE_SUPERVISION"):
        _criterion(instance_supervision="weak")


def test_criterion_finite_for_an_all_no_target_batch():
    outputs = _outputs(requires_grad=True)
    losses = _criterion()(outputs, _targets([0, 0]))
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask"].item() == 0.0 and losses["loss_phrase"].item() == 0.0
    # Every query is unmatched: Eq. 7 is the sum of BCE(p, 0), over a normaliser clamped to 1.
    relevance = outputs["predictions"][-1]["relevance_logits"]
    expected_score = torch.nn.functional.softplus(relevance).sum()
    assert losses["loss_score"].item() == pytest.approx(expected_score.item(), rel=1e-5)
    mean = _criterion(score_normalization="mean_over_queries")(outputs, _targets([0, 0]))
    assert mean["loss_score"].item() == pytest.approx(expected_score.item() / 8, rel=1e-5)
    nt = outputs["no_target_logits"]
    assert losses["loss_no_target"].item() == pytest.approx(
        0.1 * torch.nn.functional.softplus(-nt).mean().item(), rel=1e-5
    )
    sum(losses.values()).backward()


def test_criterion_values_for_a_known_match():
    # One image, one instance; query 0 predicts it perfectly, query 1 predicts the background.
    size = 16
    gt = torch.zeros(1, size, size, dtype=torch.bool)
    gt[0, :, : size // 2] = True
    perfect = torch.where(gt[0], 30.0, -30.0)
    mask_logits = torch.stack([perfect, -perfect])[None]
    relevance = torch.tensor([[1.5, -0.5]])
    queries = torch.randn(1, 2, 8)
    text = torch.randn(1, 5, 8)
    pad = torch.tensor([[False, False, False, True, True]])
    outputs = _single_prediction_outputs(
        relevance, mask_logits, queries, text, pad, perfect[None], torch.tensor([-3.0])
    )
    target = [{"masks": gt, "merged_mask": gt[0], "empty": False}]
    losses = _criterion()(outputs, target)

    sp = torch.nn.functional.softplus
    expected_score = 2 * sp(torch.tensor(-1.5)) + sp(torch.tensor(-0.5))  # over 1 instance
    assert losses["loss_score"].item() == pytest.approx(expected_score.item(), rel=1e-5)
    assert losses["loss_merged"].item() < 1e-3  # perfect merged mask, compared densely
    phrase = phrase_alignment_loss(queries, text, pad)[0, 0]
    assert losses["loss_phrase"].item() == pytest.approx(
        phrase.item(), rel=1e-5
    )  # 1 instance, lambda 1
    assert losses["loss_no_target"].item() == pytest.approx(
        0.1 * sp(torch.tensor(-3.0)).item(), rel=1e-5
    )

    # The matcher follows the masks, not the query index: swapping the queries changes nothing.
    swapped_outputs = {**outputs, "predictions": [dict(outputs["predictions"][0])]}
    swapped_outputs["predictions"][0]["mask_logits"] = mask_logits.flip(1)
    swapped_outputs["predictions"][0]["relevance_logits"] = relevance.flip(1)
    swapped_outputs["predictions"][0]["queries"] = queries.flip(1)
    torch.manual_seed(0)
    swapped = _criterion()(swapped_outputs, target)
    torch.manual_seed(0)
    again = _criterion()(outputs, target)
    for name in ("loss_score", "loss_mask", "loss_phrase"):
        assert swapped[name].item() == pytest.approx(again[name].item(), rel=1e-5), name

    # A single query with the inverted mask must be matched anyway and pay a much larger mask loss
    # (importance sampling puts most points on the boundary, where even the right mask is uncertain).
    wrong = {**outputs, "predictions": [dict(outputs["predictions"][0])]}
    wrong["predictions"][0]["mask_logits"] = -perfect[None, None]
    wrong["predictions"][0]["relevance_logits"] = relevance[:, :1]
    wrong["predictions"][0]["queries"] = queries[:, :1]
    right = {
        **outputs,
        "predictions": [dict(wrong["predictions"][0], mask_logits=perfect[None, None])],
    }
    assert (
        _criterion()(wrong, target)["loss_mask"].item()
        > 5 * _criterion()(right, target)["loss_mask"].item()
    )


# ----------------------------------------------------------------------------- point sampling near the border


def test_border_bands_of_the_point_sampled_mask_loss(load_tool):
    """tools/measure_border_sampling.py: the bands where point_sample's zero padding blends in are
    half a pixel wide at each side, and importance sampling crowds into the logits' band."""
    tool = load_tool("measure_border_sampling")
    torch.manual_seed(0)
    gt = torch.ones(4, 16, 16)  # full masks: every border point has a blended label
    logits = torch.full((4, 4, 4), 8.0)  # a confident prediction at a quarter of the resolution
    uniform = tool.measure(gt, logits, 20000, importance=False)
    # A point is in a band when it is within half a pixel of an edge on either axis.
    assert uniform["label band"] == pytest.approx(1 - (15 / 16) ** 2, abs=0.01)
    assert uniform["logit band"] == pytest.approx(1 - (3 / 4) ** 2, abs=0.01)
    # The band's blended logits are the only uncertain ones: the 75 % importance-sampled points
    # all land there (3x oversampling covers the band's 44 %), plus the band's share of the rest.
    importance = tool.measure(gt, logits, 20000, importance=True)
    assert importance["logit band"] == pytest.approx(0.75 + 0.25 * (1 - (3 / 4) ** 2), abs=0.01)

    rng = np.random.default_rng(0)
    mask = np.zeros((32, 32), dtype=bool)
    mask[10:20, 12:22] = True
    cut = tool.cut_by_an_edge(mask, rng)
    assert tool.touches_border(cut) and not tool.touches_border(mask)
    assert 0.5 * mask.sum() <= cut.sum() <= 0.8 * mask.sum()  # 20-50 % of its extent is outside


def test_paper_loss_weights_are_the_config_defaults(cfg_factory):
    cfg = cfg_factory()
    assert LossWeights.from_config(cfg) == PAPER_LOSS_WEIGHTS
    assert PointSampling.from_config(cfg) == PointSampling()  # Mask2Former's 12544 / 3 / 0.75
    cfg.MODEL.INSTALIGN.MERGED_WEIGHT = 2.5
    assert LossWeights.from_config(cfg).merged == 2.5
