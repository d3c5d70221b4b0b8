"""Optimizer parameter groups and the linear-decay schedule."""

import os

import pytest
import torch
from detectron2.config import get_cfg
from torch import nn

from instalign_d2 import add_instalign_config
from instalign_d2.solver import build_lr_scheduler, build_optimizer, build_param_groups


class TinyGRESNet(nn.Module):
    """Has every kind of parameter the grouping rules distinguish."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.text_encoder = nn.ModuleDict(
            {
                "transformer": nn.ModuleDict(
                    {
                        "embeddings": nn.Embedding(10, 4),
                        "proj": nn.Linear(4, 4),
                        "norm": nn.LayerNorm(4),
                    }
                ),
                "projection": nn.Linear(4, 4),  # new layer on top of the pretrained encoder
            }
        )
        self.query_feat = nn.Embedding(5, 4)
        self.level_embed = nn.Parameter(torch.zeros(3, 4))
        self.head = nn.Linear(4, 1)
        self.prelu = nn.PReLU()
        self.group_norm = nn.GroupNorm(2, 4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def make_cfg(**solver):
    cfg = get_cfg()
    add_instalign_config(cfg)
    cfg.SOLVER.BASE_LR = 1e-4
    cfg.SOLVER.WEIGHT_DECAY = 0.05
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    cfg.SOLVER.TEXT_ENCODER_MULTIPLIER = 0.5
    for key, value in solver.items():
        setattr(cfg.SOLVER, key, value)
    return cfg


def settings_by_name(optimizer):
    out = {}
    for group in optimizer.param_groups:
        for name in group["param_names"]:
            assert name not in out, f"{name} is in two groups"
            out[name] = (group["lr"], group["weight_decay"])
    return out


def test_every_trainable_parameter_in_exactly_one_group_with_intended_lr_and_decay():
    model = TinyGRESNet()
    optimizer = build_optimizer(make_cfg(), model)
    got = settings_by_name(optimizer)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(got) == trainable
    counted = sum(len(g["params"]) for g in optimizer.param_groups)
    assert counted == len(trainable)

    expected = {
        "backbone.0.weight": (1e-5, 0.05),
        "backbone.0.bias": (1e-5, 0.0),
        "backbone.1.weight": (1e-5, 0.0),  # norm
        "backbone.1.bias": (1e-5, 0.0),
        "text_encoder.transformer.embeddings.weight": (5e-5, 0.0),  # embedding
        "text_encoder.transformer.proj.weight": (5e-5, 0.05),
        "text_encoder.transformer.proj.bias": (5e-5, 0.0),
        "text_encoder.transformer.norm.weight": (5e-5, 0.0),
        "text_encoder.transformer.norm.bias": (5e-5, 0.0),
        "text_encoder.projection.weight": (1e-4, 0.05),  # new layer: full lr
        "text_encoder.projection.bias": (1e-4, 0.0),
        "query_feat.weight": (1e-4, 0.0),
        "level_embed": (1e-4, 0.0),
        "head.weight": (1e-4, 0.05),
        "head.bias": (1e-4, 0.0),
        "prelu.weight": (1e-4, 0.0),  # scalar: decay would turn PReLU into ReLU
        "group_norm.weight": (1e-4, 0.0),
        "group_norm.bias": (1e-4, 0.0),
    }
    assert got.keys() == expected.keys()
    for name, (lr, decay) in expected.items():
        assert got[name][0] == pytest.approx(lr), name
        assert got[name][1] == decay, name


def test_lr_multipliers_by_prefix_longest_wins_over_the_part_multipliers():
    cfg = make_cfg(LR_MULTIPLIERS=[["head.", 10.0], ["backbone.1.", 3.0]])
    got = settings_by_name(build_optimizer(cfg, TinyGRESNet()))
    assert got["head.weight"] == (pytest.approx(1e-3), 0.05)  # decay rules unchanged
    assert got["head.bias"] == (pytest.approx(1e-3), 0.0)
    assert got["backbone.1.weight"][0] == pytest.approx(3e-4)  # not backbone's 0.1
    assert got["backbone.0.weight"][0] == pytest.approx(1e-5)
    assert got["prelu.weight"][0] == pytest.approx(1e-4)


@pytest.mark.parametrize(
    "entry, message",
    [
        (["haed.", 10.0], "no trainable parameter's name starts with 'haed.'"),
        (["frozen.", 10.0], "no trainable parameter's name starts with 'frozen.'"),
        (["head.", 10.0, 1.0], "each entry is [name prefix, multiplier]"),
        ([10.0, "head."], "each entry is [name prefix, multiplier]"),
        (["head.", "ten"], "each entry is [name prefix, multiplier]"),
        (10.0, "each entry is [name prefix, multiplier]"),
    ],
)
def test_lr_multipliers_that_match_nothing_or_are_malformed_stop_the_build(entry, message):
    with pytest.raises(ValueError) as error:
        build_optimizer(make_cfg(LR_MULTIPLIERS=[entry]), TinyGRESNet())
    assert message in str(error.value)
    assert "SOLVER.LR_MULTIPLIERS" in str(error.value)


def test_norm_and_embed_decay_follow_their_keys():
    model = TinyGRESNet()
    got = settings_by_name(
        build_optimizer(make_cfg(WEIGHT_DECAY_NORM=0.01, WEIGHT_DECAY_EMBED=0.02), model)
    )
    assert got["group_norm.weight"][1] == 0.01
    assert got["backbone.1.weight"][1] == 0.01
    assert got["query_feat.weight"][1] == 0.02
    assert got["level_embed"][1] == 0.02


def test_timm_no_weight_decay_declarations_are_honoured():
    class WithDeclared(nn.Module):
        def __init__(self):
            super().__init__()
            self.relative_position_bias_table = nn.Parameter(torch.zeros(7, 2))
            self.proj = nn.Linear(2, 2)

        def no_weight_decay(self):
            return {"relative_position_bias_table"}

    model = nn.Module()
    model.backbone = WithDeclared()
    groups = build_param_groups(model, base_lr=1.0, weight_decay=0.3, weight_decay_embed=0.0)
    decay = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    assert decay == {
        "backbone.relative_position_bias_table": 0.0,
        "backbone.proj.weight": 0.3,
        "backbone.proj.bias": 0.0,
    }


def test_full_model_gradient_clipping_clips_the_global_norm():
    model = nn.Linear(3, 2)
    cfg = make_cfg()
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.5
    cfg.SOLVER.CLIP_GRADIENTS.NORM_TYPE = 2.0
    optimizer = build_optimizer(cfg, model)
    model.weight.grad = torch.full_like(model.weight, 3.0)
    model.bias.grad = torch.full_like(model.bias, 4.0)
    optimizer.step()
    total = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters()))
    assert total.item() == pytest.approx(0.5, rel=1e-5)
    # the direction is kept: the weight/bias gradient ratio is unchanged
    assert (model.weight.grad[0, 0] / model.bias.grad[0]).item() == pytest.approx(0.75)


def test_adamw_is_fused_and_takes_the_same_steps_as_the_per_tensor_loop():
    torch.manual_seed(0)
    model = TinyGRESNet()
    reference = TinyGRESNet()
    reference.load_state_dict(model.state_dict())
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(make_cfg(), model)
    assert optimizer.defaults["fused"] is True
    plain = torch.optim.AdamW(
        [
            {
                **{k: v for k, v in g.items() if k != "params"},
                "params": [dict(reference.named_parameters())[n] for n in g["param_names"]],
            }
            for g in optimizer.param_groups
        ],
        foreach=False,
    )
    for step in range(3):
        for module in (model, reference):
            module.zero_grad()
            torch.manual_seed(step)
            x = torch.randn(2, 3, 6, 6)
            loss = module.group_norm(module.backbone(x)).square().mean()
            loss = loss + module.head(module.query_feat.weight).sum() * module.prelu(loss)
            loss.backward()
        optimizer.step()
        plain.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
        # A bias right before a normalisation has a gradient of zero up to rounding (the norm
        # removes it); whether that noise moves it by an ulp depends on the CPU's kernels.
        if p.grad is not None and p.grad.abs().max() > 1e-9:
            assert not torch.equal(p, initial[name]), f"{name} did not move"


@pytest.mark.parametrize("warmup_iters", [0, 10])
def test_linear_decay_reaches_end_lr_at_max_iter(warmup_iters):
    cfg = make_cfg(MAX_ITER=100, BASE_LR_END=1e-6, WARMUP_ITERS=warmup_iters, WARMUP_FACTOR=0.1)
    model = TinyGRESNet()
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    head_group = next(g for g in optimizer.param_groups if "head.weight" in g["param_names"])
    backbone_group = next(
        g for g in optimizer.param_groups if "backbone.0.weight" in g["param_names"]
    )
    lrs = []
    for _ in range(cfg.SOLVER.MAX_ITER):
        lrs.append(head_group["lr"])
        optimizer.step()
        scheduler.step()
    assert head_group["lr"] == pytest.approx(1e-6, rel=1e-6)
    # every group decays by the same factor, so the backbone keeps its 0.1 multiplier
    assert backbone_group["lr"] == pytest.approx(1e-7, rel=1e-6)
    if warmup_iters:
        assert lrs[0] == pytest.approx(1e-5)  # WARMUP_FACTOR * BASE_LR
        assert lrs[warmup_iters - 1] < lrs[warmup_iters]
    else:
        assert lrs[0] == pytest.approx(1e-4)
    # linear after warm-up: constant decrements
    tail = torch.tensor(lrs[warmup_iters + 1 :], dtype=torch.float64)
    steps = tail[1:] - tail[:-1]
    assert torch.allclose(steps, steps.mean().expand_as(steps), rtol=1e-6, atol=1e-12)
    assert lrs[50] == pytest.approx(1e-4 + (1e-6 - 1e-4) * 0.5, rel=1e-6)


def test_groups_of_the_real_instalign_model(tiny_cfg):
    """On the real model: the new text projection learns at full rate, the pretrained text
    transformer, the backbone and the pixel decoder at their multipliers, and AIA's PReLU slope is not decayed.
    """
    from detectron2.modeling import build_model

    cfg = tiny_cfg()
    cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY = 1e-4, 0.05
    cfg.SOLVER.BACKBONE_MULTIPLIER, cfg.SOLVER.TEXT_ENCODER_MULTIPLIER = 0.1, 0.2
    cfg.SOLVER.PIXEL_DECODER_MULTIPLIER = 0.5
    model = build_model(cfg)
    got = settings_by_name(build_optimizer(cfg, model))
    assert set(got) == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, (lr, decay) in got.items():
        if name.startswith("backbone."):
            assert lr == pytest.approx(1e-5), name
        elif name.startswith("text_encoder.transformer."):
            assert lr == pytest.approx(2e-5), name
        elif name.startswith("pixel_decoder."):
            assert lr == pytest.approx(5e-5), name
        else:
            assert lr == pytest.approx(1e-4), name
        if name.endswith(".bias") or "norm" in name.lower() or "prelu" in name:
            assert decay == 0.0, name
    assert got["aggregation.prelu.weight"][1] == 0.0
    assert got["text_encoder.projection.weight"] == (pytest.approx(1e-4), 0.05)
    decayed = [n for n, (_, d) in got.items() if d > 0]
    assert decayed and all(n.endswith("weight") for n in decayed)


def test_paper_configs_learning_rates(repo_root):
    """Default: the pretrained encoders at 0.1x; the literal reading of the paper: one rate."""

    def load(name):
        cfg = add_instalign_config(get_cfg())
        cfg.merge_from_file(os.path.join(repo_root, "configs", "grefcoco", name))
        return cfg.SOLVER

    default, single = load("instalign_swin_base.yaml"), load("instalign_swin_base_single_lr.yaml")
    assert (default.BACKBONE_MULTIPLIER, default.TEXT_ENCODER_MULTIPLIER) == (0.1, 0.1)
    assert (single.BACKBONE_MULTIPLIER, single.TEXT_ENCODER_MULTIPLIER) == (1.0, 1.0)
    for solver in (default, single):
        assert (solver.BASE_LR, solver.BASE_LR_END, solver.WEIGHT_DECAY) == (1e-4, 1e-6, 0.05)
        clip = solver.CLIP_GRADIENTS
        assert (clip.ENABLED, clip.CLIP_TYPE, clip.CLIP_VALUE) == (True, "full_model", 0.01)
