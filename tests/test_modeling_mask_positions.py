"""Positions of the queries taken from their masks: their positional embeddings
(MODEL.INSTALIGN.QUERY_POSITIONS_FROM_MASKS) and the self-attention's geometry bias
(MODEL.INSTALIGN.SELF_ATTENTION_GEOMETRY_BIAS)."""

import pytest
import torch
from test_modeling_decoder import MASK_DIM, TEXT_DIM, decoders_with_and_without, inputs, tiny_cfg

from instalign_d2.modeling.transformer_decoder import build_transformer_decoder
from instalign_d2.modeling.transformer_decoder.attention_layers import SelfAttentionLayer
from instalign_d2.modeling.transformer_decoder.mask_positions import (
    OFFSET_SCALE,
    MaskPositionEmbedding,
    RelativeGeometryBias,
    mask_geometry,
)

BIG = 30.0  # a logit whose sigmoid is 1 to float precision


def _box_logits(height, width, rows, cols):
    logits = torch.full((1, 1, height, width), -BIG)
    logits[0, 0, rows, cols] = BIG
    return logits


def test_geometry_of_a_rectangle_is_its_centre_and_spread():
    # Columns 2..5 of 10 (centres 0.25..0.55), rows 6..7 of 8 (centres 0.8125, 0.9375).
    geometry = mask_geometry(_box_logits(8, 10, slice(6, 8), slice(2, 6)))[0, 0]
    xs = (torch.arange(2, 6) + 0.5) / 10
    ys = (torch.arange(6, 8) + 0.5) / 8
    expected = torch.stack((xs.mean(), ys.mean(), xs.std(unbiased=False), ys.std(unbiased=False)))
    assert torch.allclose(geometry, expected, atol=1e-5)


def test_geometry_weighs_pixels_by_their_probability():
    logits = torch.full((1, 1, 1, 4), -BIG)
    logits[0, 0, 0, 0] = BIG  # probability 1 at x = 0.125
    logits[0, 0, 0, 3] = 0.0  # probability 0.5 at x = 0.875
    cx = mask_geometry(logits)[0, 0, 0]
    assert cx.item() == pytest.approx((0.125 + 0.5 * 0.875) / 1.5, abs=1e-5)


def test_an_empty_mask_gives_finite_numbers_and_no_gradient_reaches_the_masks():
    logits = torch.full((2, 3, 4, 4), -1e4, requires_grad=True)
    geometry = mask_geometry(logits)
    assert torch.isfinite(geometry).all() and not geometry.requires_grad


def test_the_embedding_tells_left_from_right_and_has_the_query_shape():
    torch.manual_seed(0)
    embed = MaskPositionEmbedding(16)
    left = _box_logits(8, 8, slice(2, 5), slice(0, 2))
    right = _box_logits(8, 8, slice(2, 5), slice(6, 8))
    out_left, out_right = embed(left), embed(right)
    assert out_left.shape == (1, 1, 16)
    assert not torch.allclose(out_left, out_right, atol=1e-3)
    assert torch.allclose(embed(left.clone()), out_left)  # a function of the mask alone
    with pytest.raises(ValueError, match="multiple of 8"):
        MaskPositionEmbedding(12)


def test_the_decoder_uses_the_masks_positions_only_when_asked():
    features, mask_features, text, pad = inputs()
    with_masks, plain = decoders_with_and_without("QUERY_POSITIONS_FROM_MASKS")
    assert plain.mask_position_embed is None and with_masks.mask_position_embed is not None

    # The outputs differ only through the mask positions, and they differ from the first block
    # on (the initial prediction is the same).
    out_with = with_masks(features, mask_features, text, pad)["predictions"]
    out_plain = plain(features, mask_features, text, pad)["predictions"]
    assert torch.allclose(out_with[0]["mask_logits"], out_plain[0]["mask_logits"])
    assert not torch.allclose(out_with[1]["queries"], out_plain[1]["queries"], atol=1e-4)

    # With the embedding's last layer zeroed, the decoder is the plain one again.
    torch.nn.init.zeros_(with_masks.mask_position_embed.mlp.layers[-1].weight)
    torch.nn.init.zeros_(with_masks.mask_position_embed.mlp.layers[-1].bias)
    out_zeroed = with_masks(features, mask_features, text, pad)["predictions"]
    assert torch.allclose(out_zeroed[-1]["mask_logits"], out_plain[-1]["mask_logits"], atol=1e-5)

    # Gradients reach the embedding's weights.
    with_masks.train()
    torch.nn.init.normal_(with_masks.mask_position_embed.mlp.layers[-1].weight)
    loss = with_masks(features, mask_features, text, pad)["predictions"][-1]["mask_logits"].sum()
    loss.backward()
    assert with_masks.mask_position_embed.mlp.layers[0].weight.grad.abs().sum() > 0


def _left_and_right_boxes():
    """Two queries in one image: query 0's mask on the left, query 1's on the right."""
    logits = torch.full((1, 2, 8, 8), -BIG)
    logits[0, 0, 2:5, 0:2] = BIG
    logits[0, 1, 2:5, 6:8] = BIG
    return logits


def test_geometry_bias_starts_at_zero_in_the_attention_mask_layout():
    bias = RelativeGeometryBias(nheads=3)
    out = bias(torch.randn(2, 5, 8, 8))
    assert out.shape == (2 * 3, 5, 5)  # (B * nheads, reading query, read query)
    assert torch.equal(out, torch.zeros_like(out))


def test_geometry_bias_tells_which_query_lies_left_of_which():
    bias = RelativeGeometryBias(nheads=2, hidden_dim=4)
    first, last = bias.mlp.layers
    with torch.no_grad():
        # Hidden unit 0 fires when the read query lies left of the reading one (x_j < x_i);
        # head 0 reads it, head 1 reads nothing.
        first.weight.zero_(), first.bias.zero_(), last.weight.zero_(), last.bias.zero_()
        first.weight[0, 0] = -1.0
        last.weight[0, 0] = 1.0
    out = bias(_left_and_right_boxes()).view(1, 2, 2, 2)  # (B, head, i, j)
    offset = (0.875 - 0.125) * OFFSET_SCALE  # the two centres are 0.75 of the side apart
    assert out[0, 0, 1, 0].item() == pytest.approx(offset, abs=1e-4)  # right query reads left one
    assert out[0, 0, 0, 1].item() == pytest.approx(0.0, abs=1e-6)  # not the other way round
    assert torch.allclose(out.diagonal(dim1=-2, dim2=-1), torch.zeros(1, 2, 2))
    assert torch.equal(out[0, 1], torch.zeros(2, 2))


def test_self_attention_adds_the_bias_to_each_heads_logits():
    """A bias that lets every query of batch element 1 read only query 2: each of its updates is
    out_proj(W_v x_2), while batch element 0 (no bias) reads all queries."""
    torch.manual_seed(0)
    nheads, n = 2, 4
    layer = SelfAttentionLayer(8, nheads).eval()
    queries = torch.randn(2, n, 8)
    bias = torch.zeros(2, nheads, n, n)
    bias[1] = -1e4
    bias[1, :, :, 2] = 0.0
    out = layer(queries, None, bias.flatten(0, 1))

    attention = layer.attention
    update = attention.out_proj(
        queries[1, 2] @ attention.in_proj_weight[16:].T + attention.in_proj_bias[16:]
    )
    assert torch.allclose(out[1], layer.norm(queries[1] + update), atol=1e-5)
    assert torch.allclose(out[0], layer(queries, None, None)[0], atol=1e-6)


def test_the_decoder_uses_the_geometry_bias_only_when_asked():
    features, mask_features, text, pad = inputs()
    with_bias, plain = decoders_with_and_without("SELF_ATTENTION_GEOMETRY_BIAS")
    assert plain.geometry_bias is None and with_bias.geometry_bias is not None

    # Zero-initialised: the same decoder as the plain one until the bias learns something.
    out_plain = plain(features, mask_features, text, pad)["predictions"]
    out_zero = with_bias(features, mask_features, text, pad)["predictions"]
    assert torch.allclose(out_zero[-1]["mask_logits"], out_plain[-1]["mask_logits"], atol=1e-5)

    with_bias.train()
    torch.nn.init.normal_(with_bias.geometry_bias.mlp.layers[-1].weight)
    out_with = with_bias(features, mask_features, text, pad)["predictions"]
    assert torch.allclose(out_with[0]["mask_logits"], out_plain[0]["mask_logits"])
    assert not torch.allclose(out_with[1]["queries"], out_plain[1]["queries"], atol=1e-4)
    out_with[-1]["mask_logits"].sum().backward()
    assert with_bias.geometry_bias.mlp.layers[0].weight.grad.abs().sum() > 0


def test_the_geometry_bias_reads_the_expression_only_when_built_to():
    masks = _left_and_right_boxes().expand(2, -1, -1, -1)  # two expressions, one image
    text = torch.randn(2, 5, 16)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    torch.manual_seed(0)
    for bias in (RelativeGeometryBias(2, text_dim=16), RelativeGeometryBias(2)):
        torch.nn.init.normal_(bias.mlp.layers[-1].weight)
        out = bias(masks, text, pad).view(2, 2, 2, 2)
        reads_text = bias.text_code is not None
        assert torch.allclose(out[0], out[1]) != reads_text  # same masks, other words
    # Padding does not count: the second expression's padded words change nothing.
    text_changed_in_padding = text.clone()
    text_changed_in_padding[1, 3:] += 5.0
    reading = RelativeGeometryBias(2, text_dim=16)
    torch.nn.init.normal_(reading.mlp.layers[-1].weight)
    assert torch.allclose(reading(masks, text, pad), reading(masks, text_changed_in_padding, pad))
    with pytest.raises(ValueError, match="without it"):
        reading(masks)


def test_the_text_reading_bias_needs_the_bias():
    cfg = tiny_cfg()
    cfg.MODEL.INSTALIGN.SELF_ATTENTION_GEOMETRY_BIAS_READS_TEXT = True
    with pytest.raises(ValueError, match="SELF_ATTENTION_GEOMETRY_BIAS True"):
        build_transformer_decoder(cfg, 24, MASK_DIM, TEXT_DIM)
    cfg.MODEL.INSTALIGN.SELF_ATTENTION_GEOMETRY_BIAS = True
    decoder = build_transformer_decoder(cfg, 24, MASK_DIM, TEXT_DIM)
    assert decoder.geometry_bias.text_code.in_features == cfg.MODEL.INSTALIGN.HIDDEN_DIM
    features, mask_features, text, pad = inputs()
    torch.nn.init.normal_(decoder.geometry_bias.mlp.layers[-1].weight)
    decoder(features, mask_features, text, pad)["predictions"][-1][
        "relevance_logits"
    ].sum().backward()
    assert decoder.geometry_bias.text_code.weight.grad.abs().sum() > 0
