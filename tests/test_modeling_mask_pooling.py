"""Queries that get the pixel features pooled over their masks (MODEL.INSTALIGN.MASK_POOLED_QUERIES)."""

import pytest
import torch
from test_modeling_decoder import decoders_with_and_without, inputs

from instalign_d2.modeling.transformer_decoder.mask_pooling import (
    MaskPooledQueryUpdate,
    pool_over_masks,
)

BIG = 30.0  # a logit whose sigmoid is 1 (or 0) to float precision


def test_pooling_averages_the_features_inside_each_mask():
    features = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    masks = torch.full((1, 2, 4, 4), -BIG)
    masks[0, 0, :2, :2] = BIG  # top-left 2 x 2
    masks[0, 1, 3, :] = BIG  # bottom row
    pooled = pool_over_masks(features, masks)
    assert pooled.shape == (1, 2, 2)
    assert torch.allclose(pooled[0, 0], features[0, :, :2, :2].mean((-2, -1)))
    assert torch.allclose(pooled[0, 1], features[0, :, 3, :].mean(-1))


def test_soft_masks_weigh_and_larger_masks_are_resized_by_area():
    features = torch.tensor([[[[1.0, 3.0], [5.0, 7.0]]]])  # (1, 1, 2, 2)
    # A 4 x 4 mask whose left half is certain and right half at probability 0.5: resized by area
    # to 2 x 2, the weights are 1 on the left column and 0.5 on the right.
    masks = torch.full((1, 1, 4, 4), BIG)
    masks[..., 2:] = 0.0
    expected = (1.0 + 5.0 + 0.5 * (3.0 + 7.0)) / 3.0
    assert pool_over_masks(features, masks)[0, 0, 0].item() == pytest.approx(expected, rel=1e-5)


def test_the_update_starts_at_zero_and_learns_from_the_features_not_the_masks():
    update = MaskPooledQueryUpdate(in_channels=6, hidden_dim=8, num_blocks=3)
    queries = torch.randn(2, 4, 8)
    features = torch.randn(2, 6, 4, 4, requires_grad=True)
    masks = torch.randn(2, 4, 8, 8, requires_grad=True)
    assert torch.equal(update(1, queries, features, masks), queries)

    torch.nn.init.normal_(update.projections[1].weight)
    out = update(1, queries, features, masks)
    assert not torch.allclose(out, queries)
    assert torch.equal(update(0, queries, features, masks), queries)  # one map per block
    out.sum().backward()
    assert features.grad.abs().sum() > 0 and update.projections[1].weight.grad.abs().sum() > 0
    assert masks.grad is None  # where to look, not something to move


def test_the_decoder_adds_the_pooled_features_only_when_asked():
    features, mask_features, text, pad = inputs()
    with_pooling, plain = decoders_with_and_without("MASK_POOLED_QUERIES")
    assert plain.mask_pooling is None and with_pooling.mask_pooling is not None
    assert len(with_pooling.mask_pooling.projections) == len(with_pooling.blocks)

    out_plain = plain(features, mask_features, text, pad)["predictions"]
    for a, b in zip(with_pooling(features, mask_features, text, pad)["predictions"], out_plain):
        assert torch.allclose(a["queries"], b["queries"], atol=1e-6)

    for projection in with_pooling.mask_pooling.projections:
        torch.nn.init.normal_(projection.weight)
    out_with = with_pooling(features, mask_features, text, pad)["predictions"]
    # The initial prediction comes before any block; every block's output then differs.
    assert torch.allclose(out_with[0]["mask_logits"], out_plain[0]["mask_logits"])
    for a, b in zip(out_with[1:], out_plain[1:]):
        assert not torch.allclose(a["queries"], b["queries"], atol=1e-4)
