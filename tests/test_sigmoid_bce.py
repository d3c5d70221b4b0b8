"""The CPU-fast softplus and sigmoid BCE give torch's values and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from instalign_d2.layers.sigmoid_bce import sigmoid_bce_with_logits, softplus
from instalign_d2.modeling.matcher import pairwise_bce_cost

# From far in the negative tail (exp underflows) to far in the positive one, and exactly 0.
EDGE_LOGITS = torch.tensor([-120.0, -30.0, -17.0, -5.0, -1e-3, 0.0, 1e-3, 2.5, 17.0, 30.0, 120.0])


def test_softplus_matches_the_definition_at_the_edges():
    exact = [math.log1p(math.exp(v)) if v < 50 else v for v in EDGE_LOGITS.tolist()]
    assert softplus(EDGE_LOGITS).tolist() == pytest.approx(exact, rel=1e-6, abs=1e-7)
    assert softplus(torch.tensor([0.0])).item() == pytest.approx(math.log(2.0), abs=1e-7)


def test_sigmoid_bce_values_and_gradients_match_torch():
    generator = torch.Generator().manual_seed(0)
    logits = torch.cat([EDGE_LOGITS, 6 * torch.randn(500, generator=generator)])
    targets = (torch.rand(logits.shape, generator=generator) > 0.5).float()
    targets[:3] = torch.tensor([0.0, 1.0, 0.25])  # soft targets are BCE too
    ours_in = logits.clone().requires_grad_()
    torch_in = logits.clone().requires_grad_()
    ours = sigmoid_bce_with_logits(ours_in, targets)
    reference = F.binary_cross_entropy_with_logits(torch_in, targets, reduction="none")
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    weights = torch.rand(logits.shape, generator=generator)  # a non-uniform upstream gradient
    (ours * weights).sum().backward()
    (reference * weights).sum().backward()
    torch.testing.assert_close(ours_in.grad, torch_in.grad, rtol=0, atol=1e-7)


def test_sigmoid_bce_of_a_confident_wrong_logit_is_the_logit():
    # -log(sigmoid(-40)) = 40 + log(1 + e^-40): a naive log(sigmoid(x)) would give inf here.
    loss = sigmoid_bce_with_logits(torch.tensor([-40.0, 40.0]), torch.tensor([1.0, 0.0]))
    assert loss.tolist() == pytest.approx([40.0, 40.0])


def test_sigmoid_bce_takes_torchs_path_when_targets_need_a_gradient():
    logits = torch.randn(4)
    targets = torch.rand(4, requires_grad=True)
    sigmoid_bce_with_logits(logits, targets).sum().backward()
    expected = -logits  # d/dt [softplus(x) - x t] = -x
    torch.testing.assert_close(targets.grad, expected)


def test_pairwise_bce_cost_is_the_mean_bce_of_every_pair():
    generator = torch.Generator().manual_seed(1)
    predictions = 8 * torch.randn(5, 64, generator=generator)
    targets = (torch.rand(3, 64, generator=generator) > 0.6).float()
    cost = pairwise_bce_cost(predictions, targets)
    for i in range(5):
        for j in range(3):
            expected = F.binary_cross_entropy_with_logits(predictions[i], targets[j])
            assert cost[i, j].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
