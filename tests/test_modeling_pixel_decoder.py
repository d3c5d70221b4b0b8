"""Sine position encoding, the deformable encoder and the MSDeformAttn pixel decoder (tiny widths)."""

import math

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone

from instalign_d2.config import add_instalign_config
from instalign_d2.layers import msda_extension_info
from instalign_d2.modeling.pixel_decoder import (
    MSDeformAttnPixelDecoder,
    build_pixel_decoder,
    token_reference_points,
)
from instalign_d2.modeling.position_encoding import PositionEmbeddingSine

SHAPES = {
    "res2": ShapeSpec(channels=16, stride=4),
    "res3": ShapeSpec(channels=24, stride=8),
    "res4": ShapeSpec(channels=40, stride=16),
    "res5": ShapeSpec(channels=48, stride=32),
}
TINY = dict(
    conv_dim=32,
    mask_dim=20,
    transformer_enc_layers=2,
    transformer_nheads=4,
    transformer_dim_feedforward=64,
    msda_impl="pytorch",
)

needs_compiled = pytest.mark.skipif(
    msda_extension_info() == "missing", reason="the compiled ms_deform_attn extension is not built"
)


def features_for(height, width, batch=2, shapes=SHAPES, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(
            batch, s.channels, height // s.stride, width // s.stride, generator=generator
        )
        for name, s in shapes.items()
    }


# --------------------------------------------------------------------------- position encoding
def test_sine_encoding_matches_the_formula_by_hand():
    encoding = PositionEmbeddingSine(num_pos_feats=4, temperature=100, normalize=False)
    pos = encoding(torch.zeros(1, 7, 2, 3))
    assert pos.shape == (1, 8, 2, 3)
    # Pixel (row 1, column 2): 1-based coordinates y = 2, x = 3; wavelengths 1, 1, 10, 10.
    expected = [
        math.sin(2),
        math.cos(2),
        math.sin(0.2),
        math.cos(0.2),
        math.sin(3),
        math.cos(3),
        math.sin(0.3),
        math.cos(0.3),
    ]
    assert torch.allclose(pos[0, :, 1, 2], torch.tensor(expected), atol=1e-6)
    # Pixel (0, 0): y = x = 1.
    assert torch.allclose(
        pos[0, :, 0, 0],
        torch.tensor([math.sin(1), math.cos(1), math.sin(0.1), math.cos(0.1)] * 2),
        atol=1e-6,
    )


def test_normalised_encoding_ignores_padding():
    encoding = PositionEmbeddingSine(num_pos_feats=2, temperature=10000, normalize=True)
    mask = torch.zeros(1, 1, 4, dtype=torch.bool)
    mask[..., 2:] = True  # the last two columns are padding
    pos = encoding(torch.zeros(1, 3, 1, 4), mask)
    # Two valid columns: x = 1/2 and 2/2 of 2*pi; the single row is at y = 2*pi.
    assert torch.allclose(
        pos[0, 2, 0, :2], torch.tensor([math.sin(math.pi), math.sin(2 * math.pi)]), atol=1e-5
    )
    assert torch.allclose(
        pos[0, 3, 0, :2], torch.tensor([math.cos(math.pi), math.cos(2 * math.pi)]), atol=1e-5
    )
    assert torch.allclose(pos[0, 1, 0, :], torch.full((4,), math.cos(2 * math.pi)), atol=1e-5)
    # A map twice as large spans the same range: normalised positions depend on relative place only.
    encoding = PositionEmbeddingSine(num_pos_feats=4, temperature=100, normalize=True)
    small = encoding(torch.zeros(1, 1, 2, 2))
    large = encoding(torch.zeros(1, 1, 4, 4))
    # Pixel (0, 0) of a 2x2 map and (1, 1) of a 4x4 map both sit at half of 2*pi.
    half = [
        math.sin(math.pi),
        math.cos(math.pi),
        math.sin(math.pi / 10),
        math.cos(math.pi / 10),
    ] * 2
    assert torch.allclose(small[0, :, 0, 0], torch.tensor(half), atol=1e-5)
    assert torch.allclose(large[0, :, 1, 1], torch.tensor(half), atol=1e-5)


def test_sine_encoding_refuses_bad_arguments():
    with pytest.raises(ValueError, match="normalize=True"):
        PositionEmbeddingSine(scale=1.0, normalize=False)
    with pytest.raises(ValueError, match="even"):
        PositionEmbeddingSine(num_pos_feats=3)
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        PositionEmbeddingSine()(torch.zeros(1, 1, 2, 2), torch.zeros(1, 3, 3, dtype=torch.bool))


# --------------------------------------------------------------------------- encoder pieces
def test_reference_points_are_pixel_centres_on_every_level():
    points = token_reference_points(
        [(1, 2), (2, 1)], batch=3, device=torch.device("cpu"), dtype=torch.float32
    )
    assert points.shape == (3, 4, 2, 2)
    expected = torch.tensor([[0.25, 0.5], [0.75, 0.5], [0.5, 0.25], [0.5, 0.75]])
    assert torch.equal(points[2, :, 0], expected) and torch.equal(points[0, :, 1], expected)


# --------------------------------------------------------------------------- pixel decoder
@pytest.mark.parametrize("size", [(64, 64), (64, 128), (96, 64)])
def test_pixel_decoder_output_shapes_and_strides(size):
    torch.manual_seed(0)
    decoder = MSDeformAttnPixelDecoder(SHAPES, **TINY).eval()
    height, width = size
    mask_features, multi_scale = decoder.forward_features(features_for(height, width))
    assert mask_features.shape == (2, 20, height // 4, width // 4)
    assert [tuple(f.shape) for f in multi_scale] == [
        (2, 32, height // s, width // s) for s in (32, 16, 8)
    ]
    assert torch.isfinite(mask_features).all() and all(torch.isfinite(f).all() for f in multi_scale)
    assert decoder.transformer_in_features == ["res5", "res4", "res3"] and decoder.fpn_features == [
        "res2"
    ]


def test_levels_exchange_information_in_the_encoder():
    """Deformable attention reads all levels: changing only res5 changes the stride-8 output."""
    torch.manual_seed(0)
    decoder = MSDeformAttnPixelDecoder(SHAPES, **TINY).eval()
    features = features_for(64, 64)
    _, before = decoder(features)
    # (A constant shift would vanish in the input projection's GroupNorm: perturb with noise.)
    features["res5"] = features["res5"] + torch.randn(
        features["res5"].shape, generator=torch.Generator().manual_seed(1)
    )
    _, after = decoder(features)
    assert not torch.allclose(before[2], after[2], atol=1e-4)  # stride 8 saw the stride-32 change
    # Without the encoder (input projection alone) the stride-8 level ignores res5 entirely.
    assert torch.equal(
        decoder.input_proj[2](features["res3"]), decoder.input_proj[2](features_for(64, 64)["res3"])
    )


def test_gradient_reaches_every_input_and_parameter():
    decoder = MSDeformAttnPixelDecoder(SHAPES, **TINY)
    features = {name: f.requires_grad_() for name, f in features_for(64, 96).items()}
    mask_features, multi_scale = decoder(features)
    (mask_features.square().mean() + sum(f.square().mean() for f in multi_scale)).backward()
    for name, feature in features.items():
        assert feature.grad is not None and feature.grad.abs().sum() > 0, name
    unused = [n for n, p in decoder.named_parameters() if p.grad is None]
    assert not unused
    # Positions steer the sampling only: Deformable DETR starts the offset and weight layers at
    # zero, so they (not yet the level embedding) get the first gradient.
    first_attention = decoder.encoder.layers[0].self_attn
    assert first_attention.sampling_offsets.weight.grad.abs().sum() > 0
    assert first_attention.attention_weights.weight.grad.abs().sum() > 0


def test_positions_steer_sampling_once_the_offsets_have_learned():
    torch.manual_seed(0)
    decoder = MSDeformAttnPixelDecoder(SHAPES, **TINY)
    with torch.no_grad():
        for layer in decoder.encoder.layers:
            layer.self_attn.sampling_offsets.weight.normal_(std=0.1)
            layer.self_attn.attention_weights.weight.normal_(std=0.1)
    mask_features, _ = decoder(features_for(64, 64))
    mask_features.square().mean().backward()
    assert (
        decoder.level_embed.grad[0].abs().sum() > 0 and decoder.level_embed.grad[2].abs().sum() > 0
    )


def test_msda_impl_reaches_every_encoder_layer():
    decoder = MSDeformAttnPixelDecoder(SHAPES, **dict(TINY, msda_impl="pytorch"))
    assert [layer.self_attn.impl for layer in decoder.encoder.layers] == ["pytorch", "pytorch"]
    assert [layer.self_attn.n_levels for layer in decoder.encoder.layers] == [3, 3]


@needs_compiled
def test_compiled_kernel_and_reference_give_the_same_decoder_output():
    torch.manual_seed(0)
    reference = MSDeformAttnPixelDecoder(SHAPES, **dict(TINY, msda_impl="pytorch")).eval()
    compiled = MSDeformAttnPixelDecoder(SHAPES, **dict(TINY, msda_impl="cpu")).eval()
    compiled.load_state_dict(reference.state_dict())
    features = features_for(64, 96)
    expected, expected_levels = reference(features)
    got, got_levels = compiled(features)
    assert torch.allclose(got, expected, atol=1e-4)
    assert all(torch.allclose(g, e, atol=1e-4) for g, e in zip(got_levels, expected_levels))


@pytest.mark.parametrize("impl", ["pytorch", pytest.param("cpu", marks=needs_compiled)])
def test_pixel_decoder_step_reads_no_tensor_back(impl, monkeypatch):
    """The pixel decoder hands the levels down as python ints: after the first step (which
    validates the layout), a training step reads nothing back from the device -- on a GPU no
    host-device synchronisation, and a step that CUDA graphs can capture."""
    torch.manual_seed(0)
    decoder = MSDeformAttnPixelDecoder(SHAPES, **dict(TINY, msda_impl=impl))
    features = features_for(64, 96)
    decoder(features)  # first step: the layout is checked and cached

    def no_read_back(*args, **kwargs):
        raise AssertionError("a tensor was read back to python during the step")

    for name in ("tolist", "item", "__int__", "__index__", "__bool__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, no_read_back)
    mask_features, multi_scale = decoder(features)
    (mask_features.sum() + sum(level.sum() for level in multi_scale)).backward()
    monkeypatch.undo()
    assert decoder.encoder.layers[0].self_attn.sampling_offsets.weight.grad.abs().sum() > 0


def test_bad_configurations_are_refused_with_the_key():
    with pytest.raises(ValueError, match="DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES"):
        MSDeformAttnPixelDecoder(SHAPES, transformer_in_features=["res6"], **TINY)
    with pytest.raises(ValueError, match="CONVS_DIM=48"):
        MSDeformAttnPixelDecoder(SHAPES, **dict(TINY, conv_dim=48))
    no_res2 = {k: v for k, v in SHAPES.items() if k != "res2"}
    with pytest.raises(ValueError, match="Add res2"):
        MSDeformAttnPixelDecoder(no_res2, **TINY)
    decoder = MSDeformAttnPixelDecoder(SHAPES, **TINY)
    with pytest.raises(KeyError, match="res2"):
        decoder({k: v for k, v in features_for(64, 64).items() if k != "res2"})


def tiny_cfg():
    cfg = add_instalign_config(get_cfg())
    head = cfg.MODEL.SEM_SEG_HEAD
    head.CONVS_DIM, head.MASK_DIM, head.TRANSFORMER_ENC_LAYERS = 32, 16, 1
    head.NHEADS, head.DIM_FEEDFORWARD, head.MSDA_IMPL = 4, 64, "pytorch"
    return cfg


def test_build_pixel_decoder_over_detectron2_resnet():
    """Detectron2's own ResNet (res2..res5 with 256..2048 channels) feeds the decoder as is."""
    cfg = tiny_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    backbone = build_backbone(cfg).eval()
    decoder = build_pixel_decoder(cfg, backbone.output_shape()).eval()
    assert isinstance(decoder, MSDeformAttnPixelDecoder)
    assert len(decoder.encoder.layers) == 1 and decoder.mask_dim == 16
    with torch.no_grad():
        mask_features, multi_scale = decoder.forward_features(backbone(torch.randn(1, 3, 64, 96)))
    assert mask_features.shape == (1, 16, 16, 24)
    assert [tuple(f.shape[-2:]) for f in multi_scale] == [(2, 3), (4, 6), (8, 12)]


def test_build_pixel_decoder_checks_name_and_features():
    cfg = tiny_cfg()
    cfg.MODEL.SEM_SEG_HEAD.NAME = "NoSuchDecoder"
    with pytest.raises(KeyError, match="MSDeformAttnPixelDecoder"):
        build_pixel_decoder(cfg, SHAPES)
    cfg = tiny_cfg()
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res2", "res3", "res4", "res5", "res6"]
    with pytest.raises(ValueError, match=r"IN_FEATURES .* \['res6'\]"):
        build_pixel_decoder(cfg, SHAPES)
