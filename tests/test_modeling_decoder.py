"""Query decoders (POT and the Table 3(e) ablations), their layers and heads."""

import math

import pytest
import torch
from detectron2.config import get_cfg

from instalign_d2.config import add_instalign_config
from instalign_d2.modeling.transformer_decoder import (
    Mask2FormerDecoder,
    PhraseObjectTransformer,
    ReLAStyleDecoder,
    build_transformer_decoder,
)
from instalign_d2.modeling.transformer_decoder.attention_layers import (
    CrossAttentionLayer,
    SelfAttentionLayer,
)
from instalign_d2.modeling.transformer_decoder.prediction_heads import (
    InstancePredictionHeads,
    mask_logits_per_image,
    masked_attention_mask,
    slots_within_images,
)
from instalign_d2.modeling.transformer_decoder.text_attention import ObjectTextCrossAttention

HIDDEN, MASK_DIM, TEXT_DIM, QUERIES, LAYERS, TOKENS = 16, 12, 20, 5, 4, 6


def tiny_cfg(decoder="POT"):
    cfg = add_instalign_config(get_cfg())
    c = cfg.MODEL.INSTALIGN
    c.DECODER, c.HIDDEN_DIM, c.NUM_OBJECT_QUERIES, c.DEC_LAYERS, c.NHEADS, c.DIM_FEEDFORWARD = (
        decoder,
        HIDDEN,
        QUERIES,
        LAYERS,
        4,
        32,
    )
    return cfg


def inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    features = [
        torch.randn(batch, 24, s, s, generator=g) for s in (2, 4, 8)
    ]  # V1..V3, strides 32/16/8
    mask_features = torch.randn(batch, MASK_DIM, 16, 16, generator=g)  # V4
    text = torch.randn(batch, TOKENS, TEXT_DIM, generator=g)
    pad = torch.zeros(batch, TOKENS, dtype=torch.bool)
    pad[0, 3:] = True
    return features, mask_features, text, pad


def decoders_with_and_without(switch: str):
    """The tiny decoder with ``MODEL.INSTALIGN.<switch>`` on, and the plain one with the same
    weights everywhere else (its own weights loaded from the first)."""
    cfg = tiny_cfg()
    cfg.MODEL.INSTALIGN[switch] = True
    torch.manual_seed(0)
    with_switch = build_transformer_decoder(cfg, 24, MASK_DIM, TEXT_DIM).eval()
    plain = build_transformer_decoder(tiny_cfg(), 24, MASK_DIM, TEXT_DIM).eval()
    plain.load_state_dict(with_switch.state_dict(), strict=False)
    return with_switch, plain


def check_relevance_term_switch(switch: str, attribute: str, wake):
    """A decoder with ``MODEL.INSTALIGN.<switch>`` on equals the plain one while its relevance term
    (``decoder.<attribute>``) is at its start, zero; once ``wake(term)`` sets its weights, the
    relevance logits of every prediction move and nothing else does."""
    features, mask_features, text, pad = inputs()
    with_term, plain = decoders_with_and_without(switch)
    assert getattr(plain, attribute) is None and getattr(with_term, attribute) is not None

    out_plain = plain(features, mask_features, text, pad)["predictions"]
    for a, b in zip(with_term(features, mask_features, text, pad)["predictions"], out_plain):
        assert torch.allclose(a["relevance_logits"], b["relevance_logits"], atol=1e-6)

    wake(getattr(with_term, attribute))
    out_with = with_term(features, mask_features, text, pad)["predictions"]
    assert len(out_with) == len(out_plain)
    for a, b in zip(out_with, out_plain):
        assert torch.allclose(a["mask_logits"], b["mask_logits"], atol=1e-5)
        assert torch.allclose(a["queries"], b["queries"], atol=1e-5)
        assert not torch.allclose(a["relevance_logits"], b["relevance_logits"], atol=1e-4)


@pytest.fixture(scope="module", params=["POT", "M2F", "RELA"])
def decoder(request):
    torch.manual_seed(0)
    return build_transformer_decoder(tiny_cfg(request.param), 24, MASK_DIM, TEXT_DIM).eval()


def test_registry_builds_the_named_decoder():
    expected = {"POT": PhraseObjectTransformer, "M2F": Mask2FormerDecoder, "RELA": ReLAStyleDecoder}
    for name, cls in expected.items():
        assert type(build_transformer_decoder(tiny_cfg(name), 24, MASK_DIM, TEXT_DIM)) is cls
    assert (
        type(build_transformer_decoder(tiny_cfg("ReLAStyleDecoder"), 24, MASK_DIM, TEXT_DIM))
        is ReLAStyleDecoder
    )
    with pytest.raises(KeyError, match="POT"):
        build_transformer_decoder(tiny_cfg("DETR"), 24, MASK_DIM, TEXT_DIM)


def test_decoder_outputs_every_block(decoder):
    features, mask_features, text, pad = inputs()
    out = decoder(features, mask_features, text, pad)
    predictions = out["predictions"]
    assert len(predictions) == LAYERS + 1  # initial queries + one per block
    assert out["text_pad_mask"] is pad
    for p in predictions:
        assert p["relevance_logits"].shape == (2, QUERIES)
        assert p["mask_logits"].shape == (2, QUERIES, 16, 16)
        assert p["queries"].shape == (2, QUERIES, HIDDEN)
        assert p["text"].shape == (2, TOKENS, HIDDEN)
        assert all(torch.isfinite(v).all() for v in p.values())
    # Eq. 4: masks are the dot product of the mask embedding with V4.
    last = predictions[-1]
    heads = decoder.heads
    embed = heads.mask_embed(heads.norm(last["queries"]))
    assert torch.allclose(
        last["mask_logits"], torch.einsum("bnd,bdhw->bnhw", embed, mask_features), atol=1e-5
    )


def test_how_each_decoder_uses_the_text(decoder):
    features, mask_features, text, pad = inputs()
    out = decoder(features, mask_features, text, pad)
    other_text = text + torch.randn_like(text)
    other = decoder(features, mask_features, other_text, pad)
    t0 = out["predictions"][0]["text"]
    text_refined = not torch.allclose(out["predictions"][-1]["text"], t0)
    queries_read_text = not torch.allclose(
        out["predictions"][-1]["queries"], other["predictions"][-1]["queries"]
    )
    name = type(decoder).__name__
    assert text_refined == (name == "PhraseObjectTransformer")
    assert queries_read_text == (name != "Mask2FormerDecoder")


def test_padding_tokens_do_not_change_the_predictions(decoder):
    features, mask_features, text, pad = inputs()
    out = decoder(features, mask_features, text, pad)
    noisy = text.clone()
    noisy[0, 3:] = 50 * torch.randn(TOKENS - 3, TEXT_DIM)  # only padding positions of expression 0
    again = decoder(features, mask_features, noisy, pad)
    for a, b in zip(out["predictions"], again["predictions"]):
        assert torch.allclose(a["queries"], b["queries"], atol=1e-5)
        assert torch.allclose(a["mask_logits"], b["mask_logits"], atol=1e-4)
        assert torch.allclose(a["text"][0, :3], b["text"][0, :3], atol=1e-5)  # valid tokens


def test_gradients_reach_queries_embeddings_and_inputs():
    torch.manual_seed(0)
    decoder = build_transformer_decoder(tiny_cfg("POT"), 24, MASK_DIM, TEXT_DIM)
    features, mask_features, text, pad = inputs()
    text.requires_grad_()
    features[0].requires_grad_()
    out = decoder(features, mask_features, text, pad)
    loss = sum(
        p["mask_logits"].sum() + p["relevance_logits"].sum() + p["text"].pow(2).sum()
        for p in out["predictions"]
    )
    loss.backward()
    for name in (
        "query_feat.weight",
        "query_embed.weight",
        "level_embed.weight",
        "input_proj.0.weight",
        "text_proj.weight",
    ):
        assert dict(decoder.named_parameters())[name].grad.abs().sum() > 0, name
    assert text.grad.abs().sum() > 0 and features[0].grad.abs().sum() > 0


def test_object_text_cross_attention_matches_its_equations():
    torch.manual_seed(0)
    dim, heads = 8, 2
    layer = ObjectTextCrossAttention(dim, heads)
    queries, text = torch.randn(1, 3, dim), torch.randn(1, 4, dim)
    query_pos = torch.randn(1, 3, dim)
    pad = torch.tensor([[False, False, False, True]])
    new_queries, new_text = layer(queries, text, pad, query_pos)

    d = dim // heads
    q = layer.query_proj(queries + query_pos)[0].view(3, heads, d)
    k = layer.text_key_proj(text)[0].view(4, heads, d)
    v_text = layer.text_value_proj(text)[0].view(4, heads, d)
    v_query = layer.query_value_proj(queries)[0].view(3, heads, d)
    query_read, text_read = [], []
    for h in range(heads):
        a = q[:, h] @ k[:, h].T / math.sqrt(d)  # one affinity matrix A per head
        a_text = a[:, :3].softmax(-1)  # over the valid tokens
        query_read.append(a_text @ v_text[:3, h])
        text_read.append(a.T.softmax(-1) @ v_query[:, h])  # over the queries
    expected_q = layer.query_norm(queries[0] + layer.query_out_proj(torch.cat(query_read, -1)))
    expected_t = layer.text_norm(text[0] + layer.text_out_proj(torch.cat(text_read, -1)))
    assert torch.allclose(new_queries[0], expected_q, atol=1e-5)
    assert torch.allclose(new_text[0], expected_t, atol=1e-5)


def test_masked_attention_mask_by_hand():
    logits = torch.tensor(
        [[[[5.0, -5.0], [5.0, -5.0]], [[-5.0, -5.0], [-5.0, -5.0]]]]
    )  # B=1, N=2, 2x2
    mask = masked_attention_mask(logits, (2, 2), nheads=3)
    assert mask.shape == (3, 2, 4)
    # Query 0 may look at its left column only; query 1 predicts nothing, so it may look everywhere.
    assert mask[0, 0].tolist() == [False, True, False, True]
    assert mask[0, 1].tolist() == [False] * 4
    assert torch.equal(mask[0], mask[2])


def test_masked_cross_attention_ignores_blocked_visual_tokens():
    torch.manual_seed(0)
    layer = CrossAttentionLayer(8, 2).eval()
    queries, memory = torch.randn(1, 2, 8), torch.randn(1, 4, 8)
    blocked = torch.tensor(
        [[[False, False, True, True], [False, True, True, False]]]
    ).repeat_interleave(2, 0)
    out = layer(queries, memory, attn_mask=blocked)
    changed = memory.clone()
    changed[0, 2] += 10  # blocked for both queries
    assert torch.allclose(layer(queries, changed, attn_mask=blocked), out, atol=1e-6)
    changed[0, 3] += 10  # visible to query 1 only
    moved = layer(queries, changed, attn_mask=blocked)
    assert torch.allclose(moved[0, 0], out[0, 0], atol=1e-6) and not torch.allclose(
        moved[0, 1], out[0, 1]
    )


@pytest.mark.parametrize("positions_in_values", [False, True])
def test_cross_attention_values_carry_positions_only_when_asked(positions_in_values):
    """One visible memory token: the update is out_proj(W_v value), value = memory (+ position)."""
    torch.manual_seed(0)
    layer = CrossAttentionLayer(8, 2, positions_in_values=positions_in_values).eval()
    queries, memory, position = torch.randn(1, 1, 8), torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    only_token_1 = torch.tensor([[[True, False, True]]]).repeat_interleave(2, 0)
    out = layer(queries, memory, attn_mask=only_token_1, memory_pos=position)

    attention = layer.attention
    w_v = attention.in_proj_weight[16:]
    b_v = attention.in_proj_bias[16:]
    value = memory[0, 1] + (position[0, 1] if positions_in_values else 0.0)
    update = attention.out_proj(value @ w_v.T + b_v)
    expected = layer.norm(queries[0, 0] + update)  # post-norm residual
    assert torch.allclose(out[0, 0], expected, atol=1e-5)


@pytest.mark.parametrize(
    "key, layer",
    [
        ("POSITIONS_IN_VALUES", "visual_cross_attention"),
        ("SELF_ATTENTION_POSITIONS_IN_VALUES", "self_attention"),
    ],
)
def test_decoder_reads_positions_in_values_from_the_config(key, layer):
    """Each switch turns on its own attention in every block, and only that one."""
    cfg = tiny_cfg()
    cfg.MODEL.INSTALIGN[key] = True
    layers = ("visual_cross_attention", "self_attention")
    decoder = build_transformer_decoder(cfg, 24, MASK_DIM, TEXT_DIM)
    for name in layers:
        assert all(getattr(b, name).positions_in_values == (name == layer) for b in decoder.blocks)
    assert not any(
        getattr(b, name).positions_in_values
        for b in build_transformer_decoder(tiny_cfg(), 24, MASK_DIM, TEXT_DIM).blocks
        for name in layers
    )


@pytest.mark.parametrize("positions_in_values", [False, True])
def test_self_attention_values_carry_positions_only_when_asked(positions_in_values):
    """Two queries, the second's key made dominant: query 0 reads (almost) only query 1's value,
    which is query 1's content plus, when asked, its position."""
    torch.manual_seed(0)
    layer = SelfAttentionLayer(8, 1, positions_in_values=positions_in_values).eval()
    with torch.no_grad():  # queries and keys = their inputs, so a large input makes a dominant key
        layer.attention.in_proj_weight[:16].copy_(torch.eye(8).repeat(2, 1))
        layer.attention.in_proj_bias.zero_()
    queries, position = torch.randn(1, 2, 8), torch.randn(1, 2, 8)
    queries[0, 0], position[0, 0] = 1.0, 0.0  # query 0 looks along the all-ones direction ...
    position[0, 1] = 50.0  # ... and query 1's key points far along it
    out = layer(queries, position)

    attention = layer.attention
    w_v, b_v = attention.in_proj_weight[16:], attention.in_proj_bias[16:]
    value = queries[0, 1] + (position[0, 1] if positions_in_values else 0.0)
    expected = layer.norm(queries[0, 0] + attention.out_proj(value @ w_v.T + b_v))
    assert torch.allclose(out[0, 0], expected, atol=1e-4)


def test_prediction_heads_shapes():
    heads = InstancePredictionHeads(HIDDEN, MASK_DIM)
    relevance, masks = heads(torch.randn(3, QUERIES, HIDDEN), torch.randn(3, MASK_DIM, 7, 9))
    assert relevance.shape == (3, QUERIES) and masks.shape == (3, QUERIES, 7, 9)


def test_decoder_plain_arguments_and_level_count_check():
    decoder = PhraseObjectTransformer(
        in_channels=HIDDEN,
        mask_dim=MASK_DIM,
        text_dim=HIDDEN,
        hidden_dim=HIDDEN,
        num_queries=3,
        nheads=2,
        dim_feedforward=16,
        dec_layers=2,
    )
    assert isinstance(decoder.input_proj[0], torch.nn.Identity) and isinstance(
        decoder.text_proj, torch.nn.Identity
    )
    features, mask_features, _, pad = inputs()
    with pytest.raises(ValueError, match="3 visual levels"):
        decoder(features[:2], mask_features, torch.randn(2, TOKENS, HIDDEN), pad)


# Expressions of three images, neither sorted nor equally many per image (image 1 has none).
IMAGE_INDEX = torch.tensor([2, 0, 0, 3, 2, 2, 0])


def test_slots_count_the_earlier_expressions_of_the_same_image():
    assert slots_within_images(IMAGE_INDEX).tolist() == [0, 0, 1, 0, 1, 2, 2]


def test_mask_logits_per_image_equal_those_of_copied_features_with_their_gradients():
    g = torch.Generator().manual_seed(3)
    embed = torch.randn(len(IMAGE_INDEX), QUERIES, MASK_DIM, generator=g, requires_grad=True)
    per_image = torch.randn(4, MASK_DIM, 6, 5, generator=g, requires_grad=True)
    upstream = torch.randn(len(IMAGE_INDEX), QUERIES, 6, 5, generator=g)

    shared = mask_logits_per_image(embed, per_image, IMAGE_INDEX)
    copied = mask_logits_per_image(embed, per_image[IMAGE_INDEX], None)
    by_hand = torch.stack(
        [embed[e] @ per_image[i].flatten(1) for e, i in enumerate(IMAGE_INDEX.tolist())]
    ).view_as(copied)
    assert torch.allclose(copied, by_hand, atol=1e-5)
    assert torch.allclose(shared, copied, atol=1e-5)

    grads_shared = torch.autograd.grad((shared * upstream).sum(), (embed, per_image))
    grads_copied = torch.autograd.grad((copied * upstream).sum(), (embed, per_image))
    for a, b in zip(grads_shared, grads_copied):
        assert torch.allclose(a, b, atol=1e-5)
    assert grads_shared[1][1].abs().max() == 0  # image 1 has no expression


def with_every_per_query_switch():
    cfg = tiny_cfg()
    c = cfg.MODEL.INSTALIGN
    c.MASK_POOLED_QUERIES = c.QUERY_POSITIONS_FROM_MASKS = c.RELATIVE_LOCATION_SCORE = True
    c.CATEGORY_CLASSES = 3
    torch.manual_seed(1)
    return build_transformer_decoder(cfg, 24, MASK_DIM, TEXT_DIM).eval()


@pytest.mark.parametrize("switches", [False, True])
def test_decoder_reads_features_per_image_as_it_reads_copies(decoder, switches):
    """The same predictions whether each expression gets a copy of its image's features or the
    decoder reads them per image through ``image_index``, with the switches that read the
    features or the masks too."""
    if switches:
        decoder = with_every_per_query_switch()
    features, mask_features, text, _ = inputs(batch=4, seed=5)
    expressions = len(IMAGE_INDEX)
    g = torch.Generator().manual_seed(6)
    text = torch.randn(expressions, TOKENS, TEXT_DIM, generator=g)
    pad = torch.zeros(expressions, TOKENS, dtype=torch.bool)
    pad[1, 2:] = True
    copied = decoder([f[IMAGE_INDEX] for f in features], mask_features[IMAGE_INDEX], text, pad)
    shared = decoder(features, mask_features, text, pad, IMAGE_INDEX)
    for a, b in zip(copied["predictions"], shared["predictions"]):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.allclose(a[key], b[key], atol=1e-5), key
