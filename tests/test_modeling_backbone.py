"""TimmBackbone: timm features_only models as Detectron2 backbones (tiny widths, random init)."""

import logging
import re

import pytest
import timm
import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import build_backbone

from instalign_d2.config import add_instalign_config
from instalign_d2.modeling.backbone import TimmBackbone

SWIN = "swin_tiny_patch4_window7_224"
# A Swin small enough for tests: channels 8/16/32/64 (never equal to a map side, so NCHW and
# NHWC cannot be confused), a shifted-window block in stage 1, window 4.
TINY_SWIN = dict(embed_dim=8, depths=(2, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=4)
STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


def tiny_swin(**kwargs):
    options = dict(model_name=SWIN, img_size=64, model_kwargs=TINY_SWIN)
    options.update(kwargs)
    return TimmBackbone(**options)


def full_tiny_swin(seed=0):
    """The same tiny Swin as a plain timm classifier, as a checkpoint would hold it."""
    torch.manual_seed(seed)
    return timm.create_model(SWIN, img_size=64, **TINY_SWIN)


@pytest.mark.parametrize("size", [(64, 64), (64, 96), (128, 64)])
def test_swin_returns_nchw_maps_at_strides_4_to_32(size):
    torch.manual_seed(0)
    backbone = tiny_swin().eval()
    images = torch.randn(2, 3, *size)
    outputs = backbone(images)
    shapes = backbone.output_shape()
    assert list(outputs) == ["res2", "res3", "res4", "res5"]
    for name, feature in outputs.items():
        assert shapes[name].stride == STRIDES[name]
        assert feature.shape == (
            2,
            shapes[name].channels,
            size[0] // STRIDES[name],
            size[1] // STRIDES[name],
        )
        assert torch.isfinite(feature).all()
    assert [shapes[n].channels for n in STRIDES] == [8, 16, 32, 64]
    # NCHW means timm's NHWC map with its channel axis moved, values untouched.
    raw = backbone.body(images)
    assert torch.equal(outputs["res3"], raw[1].permute(0, 3, 1, 2))


def test_swin_is_built_for_img_size_and_keeps_its_window():
    backbone = tiny_swin(img_size=96)
    assert tuple(backbone.body.patch_embed.img_size) == (96, 96)
    assert tuple(backbone.body.layers_0.blocks[1].window_size) == (4, 4)
    assert tuple(backbone.body.layers_0.blocks[1].shift_size) == (
        2,
        2,
    )  # the shifted block stays shifted


def test_norm_outputs_layer_normalises_every_pixel_over_channels():
    torch.manual_seed(0)
    backbone = tiny_swin(norm_outputs=True).eval()
    for name, feature in backbone(torch.randn(1, 3, 64, 96)).items():
        per_pixel = feature.permute(0, 2, 3, 1)
        assert torch.allclose(per_pixel.mean(-1), torch.zeros(()), atol=1e-5), name
        assert torch.allclose(
            per_pixel.var(-1, unbiased=False), torch.ones(()), atol=1e-2
        ), name  # eps of LayerNorm
    assert set(backbone.output_norms) == set(STRIDES)


def test_resnet_skips_the_stride_2_stem_and_returns_nchw():
    backbone = TimmBackbone(
        model_name="resnet18", out_features=["res2", "res3", "res4", "res5"]
    ).eval()
    shapes = backbone.output_shape()
    assert [shapes[n].channels for n in STRIDES] == [64, 128, 256, 512]
    assert [shapes[n].stride for n in STRIDES] == [4, 8, 16, 32]
    assert backbone.size_divisibility == 32
    outputs = backbone(torch.randn(1, 3, 64, 96))
    for name, feature in outputs.items():
        assert feature.shape == (1, shapes[name].channels, 64 // STRIDES[name], 96 // STRIDES[name])
    assert not backbone.output_norms


def test_out_features_subset_and_bad_names():
    backbone = TimmBackbone(model_name="resnet18", out_features=["res5", "res3"])
    assert list(backbone(torch.randn(1, 3, 64, 64))) == ["res3", "res5"]
    with pytest.raises(ValueError, match="res6"):
        TimmBackbone(model_name="resnet18", out_features=["res6"])


def test_input_not_divisible_by_32_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"80x64 is not divisible by 32.*size_divisibility"):
        tiny_swin()(torch.randn(1, 3, 80, 64))


def test_gradient_reaches_the_first_layer():
    backbone = tiny_swin(norm_outputs=True)
    outputs = backbone(torch.randn(1, 3, 64, 64))
    sum(feature.square().mean() for feature in outputs.values()).backward()
    first = backbone.body.patch_embed.proj.weight.grad
    assert first is not None and first.abs().sum() > 0
    assert backbone.output_norms["res2"].weight.grad.abs().sum() > 0
    # No parameter left out (timm's unused classifier is dropped): DDP needs no unused-parameter search.
    assert [name for name, p in backbone.named_parameters() if p.grad is None] == []


def test_freeze_fixes_timm_weights_and_keeps_them_in_eval_mode():
    backbone = tiny_swin(freeze=True, norm_outputs=True, drop_path_rate=0.5)
    backbone.train()
    assert all(not p.requires_grad for p in backbone.body.parameters())
    assert all(p.requires_grad for p in backbone.output_norms.parameters())
    assert not backbone.body.training and backbone.training
    images = torch.randn(1, 3, 64, 64)
    # Frozen: drop-path is off, so two training-mode passes agree.
    assert torch.equal(backbone(images)["res5"], backbone(images)["res5"])


@pytest.mark.parametrize(
    "freeze_at, frozen, trained",
    [
        (0, [], ["conv1", "layer1"]),
        (1, ["conv1", "bn1"], ["layer1", "layer2"]),
        (2, ["conv1", "bn1", "layer1"], ["layer2", "layer4"]),
        (5, ["conv1", "layer1", "layer4"], []),
    ],
)
def test_freeze_at_fixes_the_stem_and_the_first_stages(freeze_at, frozen, trained):
    torch.manual_seed(0)
    backbone = TimmBackbone(model_name="resnet10t", freeze_at=freeze_at).train()
    children = dict(backbone.body.named_children())
    for name in frozen:
        assert all(not p.requires_grad for p in children[name].parameters()), name
        assert not children[name].training, name  # BatchNorm statistics kept
    for name in trained:
        assert all(p.requires_grad for p in children[name].parameters()), name
        assert children[name].training, name
    images = torch.randn(2, 3, 64, 64, requires_grad=True)  # a graph even when all is frozen
    sum(f.sum() for f in backbone(images).values()).backward()
    for name in frozen:
        assert all(p.grad is None for p in children[name].parameters()), name
    for name in trained:
        assert all(p.grad is not None for p in children[name].parameters()), name


def test_freeze_at_on_swin_fixes_the_patch_embedding_and_reads_the_config():
    cfg = add_instalign_config(get_cfg())
    cfg.MODEL.TIMM.FREEZE_AT = 1
    assert TimmBackbone.from_config(cfg)["freeze_at"] == 1
    body = tiny_swin(freeze_at=1).body
    assert not any(p.requires_grad for p in body.patch_embed.parameters())
    assert all(p.requires_grad for p in body.layers_0.parameters())
    with pytest.raises(ValueError, match="FREEZE_AT=6"):
        tiny_swin(freeze_at=6)


def test_drop_path_rate_reaches_timm():
    rates = [
        m.drop_prob
        for m in tiny_swin(drop_path_rate=0.3).modules()
        if type(m).__name__ == "DropPath"
    ]
    assert rates and max(rates) == pytest.approx(0.3)
    assert not [
        m for m in tiny_swin(drop_path_rate=0.0).modules() if type(m).__name__ == "DropPath"
    ]


@pytest.mark.parametrize("suffix", ["pth", "safetensors"])
def test_weights_load_from_a_local_file(tmp_path, suffix):
    source = full_tiny_swin(seed=1)
    path = tmp_path / f"tiny_swin.{suffix}"
    if suffix == "pth":
        torch.save({"model": source.state_dict()}, path)  # the original releases wrap it in "model"
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    torch.manual_seed(2)
    loaded = tiny_swin(pretrained_weights=str(path))
    random = tiny_swin()
    expected = source.layers[2].blocks[0].attn.qkv.weight
    assert torch.equal(loaded.body.layers_2.blocks[0].attn.qkv.weight, expected)
    assert torch.equal(loaded.body.patch_embed.proj.weight, source.patch_embed.proj.weight)
    assert not torch.equal(random.body.layers_2.blocks[0].attn.qkv.weight, expected)


def test_original_swin_release_layout_is_converted_by_timm(tmp_path):
    """Microsoft's checkpoints put each patch merging at the end of a stage, timm at the start."""
    source = full_tiny_swin(seed=3)
    original = {}
    for key, value in source.state_dict().items():
        key = re.sub(
            r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key
        )
        original[key.replace("head.fc.", "head.")] = value
    path = tmp_path / "swin_original.pth"
    torch.save({"model": original}, path)
    loaded = tiny_swin(pretrained_weights=str(path))
    assert torch.equal(
        loaded.body.layers_1.downsample.reduction.weight,
        source.layers[1].downsample.reduction.weight,
    )


def test_unmatched_checkpoint_keys_are_reported(tmp_path, caplog):
    state = full_tiny_swin().state_dict()
    del state["layers.3.blocks.0.mlp.fc1.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with caplog.at_level(logging.INFO, logger="instalign_d2"):
        tiny_swin(pretrained_weights=str(path))
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name.startswith("instalign_d2")
    ]
    assert any(
        "1 missing key" in m and "layers.3.blocks.0.mlp.fc1.weight" in m for m in warnings
    ), warnings
    assert any("1 unexpected key" in m and "extra.weight" in m for m in warnings), warnings
    assert not any("head.fc" in m for m in warnings)  # the dropped classifier is not news


def test_missing_weights_file_names_the_key_and_the_path(tmp_path):
    path = tmp_path / "nowhere" / "swin.pth"
    with pytest.raises(FileNotFoundError, match=r"MODEL\.TIMM\.PRETRAINED_WEIGHTS") as error:
        tiny_swin(pretrained_weights=str(path))
    assert str(path) in str(error.value)


def test_build_backbone_from_config():
    cfg = add_instalign_config(get_cfg())
    cfg.MODEL.BACKBONE.NAME = "TimmBackbone"
    cfg.MODEL.TIMM.NAME = SWIN
    # As a YAML file gives them: lists, not tuples.
    cfg.MODEL.TIMM.KWARGS = CfgNode(
        {k: list(v) if isinstance(v, tuple) else v for k, v in TINY_SWIN.items()}
    )
    cfg.MODEL.TIMM.DROP_PATH_RATE = 0.0
    cfg.INPUT.IMAGE_SIZE = 96
    backbone = build_backbone(cfg).eval()
    assert isinstance(backbone, TimmBackbone)
    assert tuple(backbone.body.patch_embed.img_size) == (96, 96)
    assert set(backbone.output_norms) == set(STRIDES)  # NORM_OUTPUTS defaults to True
    outputs = backbone(torch.randn(1, 3, 96, 96))
    assert outputs["res5"].shape == (1, 64, 3, 3)
