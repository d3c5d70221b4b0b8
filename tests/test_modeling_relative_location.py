"""The relevance term from where each instance lies among the candidates
(MODEL.INSTALIGN.RELATIVE_LOCATION_SCORE)."""

import os

import pytest
import torch
from detectron2.config import get_cfg
from test_modeling_decoder import MASK_DIM, TEXT_DIM, check_relevance_term_switch

from instalign_d2.config import add_instalign_config
from instalign_d2.modeling.transformer_decoder import build_transformer_decoder
from instalign_d2.modeling.transformer_decoder.relative_location import (
    MAX_Z,
    MIN_SPREAD,
    RelativeLocationScore,
    candidate_z_scores,
)
from instalign_d2.solver.optimizer import _lr_multipliers

BIG = 30.0  # a logit whose sigmoid is 1 to float precision


def _boxes(columns, size=8):
    """One image's masks: query ``i`` covers rows 2..4 and the columns ``columns[i]``."""
    logits = torch.full((1, len(columns), size, size), -BIG)
    for i, cols in enumerate(columns):
        logits[0, i, 2:5, cols] = BIG
    return logits


def test_z_scores_place_each_centre_among_the_weighted_candidates():
    centres = torch.tensor([[[0.4, 0.5], [0.6, 0.5], [0.05, 0.9]]])
    # Two candidates of equal weight, a third that is no candidate: the first two are one
    # standard deviation either side of their mean; the third does not move the mean or the
    # spread, and its own z-score is cut at MAX_Z.
    z = candidate_z_scores(centres, torch.tensor([[1.0, 1.0, 0.0]]))
    assert torch.allclose(z[0, :2, 0], torch.tensor([-1.0, 1.0]))
    assert z[0, 2, 0].item() == pytest.approx(-MAX_Z)
    # y: both candidates at 0.5, spread 0 -> MIN_SPREAD; the third lies 0.4 below them.
    assert torch.allclose(z[0, :2, 1], torch.zeros(2))
    assert z[0, 2, 1].item() == pytest.approx(min(0.4 / MIN_SPREAD, MAX_Z))
    # A single candidate sits at the mean: z = 0 whatever its place.
    assert torch.allclose(
        candidate_z_scores(centres, torch.tensor([[0.0, 1.0, 0.0]]))[0, 1], torch.zeros(2)
    )


def test_the_term_starts_at_zero():
    term = RelativeLocationScore(16)
    logits = torch.tensor([[2.0, 1.0, -3.0]])
    text = torch.randn(1, 4, 16)
    out = term(
        logits,
        _boxes([slice(0, 2), slice(6, 8), slice(3, 5)]),
        text,
        torch.zeros(1, 4, dtype=torch.bool),
    )
    assert torch.equal(out, logits)


def test_a_negative_x_coefficient_favours_the_leftmost_candidate():
    term = RelativeLocationScore(16)
    with torch.no_grad():
        term.coefficients.bias.copy_(torch.tensor([-3.0, 0.0]))  # "leftmost": x counts against
    masks = _boxes([slice(0, 2), slice(6, 8), slice(3, 5)])  # left, right, middle
    logits = torch.tensor([[2.0, 2.0, -6.0]])  # two candidates; the middle query is ruled out
    text = torch.randn(1, 4, 16)
    out = term(logits, masks, text, torch.zeros(1, 4, dtype=torch.bool))
    p = torch.sigmoid(logits)[0]
    # The candidates lie one standard deviation either side of their (almost equally weighted)
    # mean: the left one gains p * 3, the right one loses as much.
    assert out[0, 0].item() == pytest.approx(2.0 + 3.0 * p[0].item(), abs=0.02)
    assert out[0, 1].item() == pytest.approx(2.0 - 3.0 * p[1].item(), abs=0.02)
    assert out[0, 0] > out[0, 1]
    # A query the score has ruled out moves by at most p * 3 * MAX_Z, which keeps it ruled out.
    assert abs(out[0, 2].item() + 6.0) <= 3.0 * MAX_Z * p[2].item() + 1e-6
    assert out[0, 2] < 0


def test_the_coefficients_read_the_words_not_the_padding_and_learn_from_the_scores():
    torch.manual_seed(0)
    term = RelativeLocationScore(16)
    torch.nn.init.normal_(term.coefficients.weight)
    masks = _boxes([slice(0, 2), slice(6, 8)]).requires_grad_(True)
    logits = torch.tensor([[1.0, 1.0]], requires_grad=True)
    text = torch.randn(1, 5, 16, requires_grad=True)
    pad = torch.tensor([[False, False, False, True, True]])
    out = term(logits, masks, text, pad)
    padded_changed = text.detach().clone()
    padded_changed[0, 3:] += 5.0
    assert torch.allclose(out, term(logits, masks, padded_changed, pad))
    other_words = text.detach().clone()
    other_words[0, :3] = torch.randn(3, 16)
    assert not torch.allclose(out, term(logits, masks, other_words, pad))

    (out[0, 0] - out[0, 1]).backward()
    assert term.coefficients.weight.grad.abs().sum() > 0
    assert text.grad[0, :3].abs().sum() > 0 and text.grad[0, 3:].abs().sum() == 0
    assert masks.grad is None  # the geometry is read, never moved
    assert torch.allclose(logits.grad, torch.tensor([[1.0, -1.0]]))  # the weights are read too


def test_the_decoder_adds_the_term_only_when_asked_and_only_to_the_scores():
    check_relevance_term_switch(
        "RELATIVE_LOCATION_SCORE",
        "relative_location",
        lambda term: torch.nn.init.normal_(term.coefficients.weight),
    )


def test_the_tiny_config_has_the_term_and_its_text_blind_twin_does_not():
    configs = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "synthetic")
    built, configs_solver = {}, {}
    for name in ("instalign_tiny.yaml", "instalign_tiny_text_blind.yaml"):
        cfg = add_instalign_config(get_cfg())
        cfg.merge_from_file(os.path.join(configs, name))
        built[name] = build_transformer_decoder(cfg, 24, MASK_DIM, TEXT_DIM)
        configs_solver[name] = cfg.SOLVER
    assert built["instalign_tiny.yaml"].relative_location is not None
    # The twin's scores must not hear the expression through the term's coefficients.
    assert built["instalign_tiny_text_blind.yaml"].relative_location is None
    # Each config's learning-rate multipliers name parameters its decoder has: the tiny config
    # trains the term faster, and the twin, which has no term, must not ask for it.
    for name, decoder in built.items():
        solver = configs_solver[name]
        model = torch.nn.ModuleDict({"transformer_decoder": decoder})
        multipliers = _lr_multipliers(solver, model)
        for prefix, factor in solver.LR_MULTIPLIERS:
            assert multipliers[prefix] == factor
    assert len(configs_solver["instalign_tiny.yaml"].LR_MULTIPLIERS) == 1
