"""The InstAlign meta-architecture: training losses, gradients, the inference contract
(docs/interfaces.md §2-4), image/expression grouping, configs, and overfitting one batch."""

import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import instalign_d2.instalign_model  # noqa: F401  (registers InstAlign)
from instalign_d2.config import add_instalign_config
from instalign_d2.instalign_model import InstAlign

SIZE = 64  # the tiny config's INPUT.IMAGE_SIZE (tests/conftest.py)
MAX_TOKENS = 12  # its MAX_TOKENS


@pytest.fixture(scope="module")
def model(tiny_cfg, tiny_image_size, tiny_max_tokens):
    assert (tiny_image_size, tiny_max_tokens) == (SIZE, MAX_TOKENS)
    torch.manual_seed(0)
    return build_model(tiny_cfg())


def draw_scene(seed):
    """A uint8 image with coloured rectangles and their instance masks, by colour name."""
    g = torch.Generator().manual_seed(seed)
    image = torch.full((3, SIZE, SIZE), 40, dtype=torch.uint8)
    colours = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}
    masks = {}
    for k, (name, rgb) in enumerate(colours.items()):
        for j in range(2 if name == "blue" else 1):
            top, left = int(torch.randint(0, SIZE - 20, (1,), generator=g)), 4 + 20 * k
            mask = torch.zeros(SIZE, SIZE, dtype=torch.bool)
            mask[top : top + 14 + 4 * j, left + 8 * j : left + 12 + 8 * j] = True
            image[:, mask] = torch.tensor(rgb, dtype=torch.uint8)[:, None]
            masks.setdefault(name, []).append(mask)
    return image, masks


def training_batch(model, model_input):
    image_a, masks_a = draw_scene(0)
    image_b, masks_b = draw_scene(1)
    return [
        model_input(model, image_a, "the red square", masks_a["red"]),
        model_input(model, image_a, "both blue circles", masks_a["blue"]),
        model_input(model, image_b, "the purple cone", (), file_name="other.png"),
        model_input(model, image_b, "all yellow things", (), file_name="other.png"),
    ]


# ----------------------------------------------------------------------------- training


def test_training_losses_are_finite_and_gradients_reach_every_part(model, model_input):
    model.train()
    model.zero_grad()
    losses = model(training_batch(model, model_input))
    assert "loss_merged" in losses and "loss_no_target" in losses and "loss_phrase_0" in losses
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    sum(losses.values()).backward()

    def grad_norm(module_params):
        return sum(p.grad.abs().sum().item() for p in module_params if p.grad is not None)

    assert grad_norm(model.backbone.parameters()) > 0
    assert grad_norm(model.pixel_decoder.parameters()) > 0
    assert grad_norm(model.text_encoder.transformer.parameters()) > 0
    assert model.transformer_decoder.query_feat.weight.grad.abs().sum() > 0
    assert model.transformer_decoder.query_embed.weight.grad.abs().sum() > 0
    assert model.aggregation.prelu.weight.grad.abs().sum() > 0
    assert grad_norm(model.no_target_head.parameters()) > 0


def test_merged_logits_only_where_the_criterion_reads_them(tiny_cfg, model_input):
    """Training merges (Eq. 8) every prediction when each has an L_merged, else only the last;
    inference always only the last."""
    torch.manual_seed(0)
    for last_only in (False, True):
        model = build_model(tiny_cfg(MERGED_LOSS_ON_LAST_ONLY=last_only)).train()
        with torch.no_grad():
            outputs, visual, image_index = model.compute_outputs(training_batch(model, model_input))
        merged = ["merged_logits" in p for p in outputs["predictions"]]
        assert len(merged) == 4 and merged[-1]  # K = 3 blocks + the initial queries
        assert merged[:-1] == [not last_only] * 3
        assert image_index.tolist() == [0, 0, 1, 1] and len(visual.image_sizes) == 2
        model.eval()
        outputs, _, _ = model.compute_outputs(training_batch(model, model_input))
        assert ["merged_logits" in p for p in outputs["predictions"]] == [False] * 3 + [True]


def test_training_on_an_all_no_target_batch_is_finite(model, model_input):
    model.train()
    image, _ = draw_scene(3)
    batch = [
        model_input(model, image, "the purple cone"),
        model_input(model, image, "all yellow things"),
    ]
    losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask"].item() == 0.0
    sum(losses.values()).backward()


def test_prepare_targets_pads_and_checks(model, model_input):
    image, masks = draw_scene(0)
    x = model_input(model, image, "the red square", masks["red"])
    del x["gt_mask_merged"]  # derived from the instances when absent
    (target,) = model.prepare_targets([x], (96, 64))
    assert target["masks"].shape == (1, 96, 64) and target["merged_mask"].shape == (96, 64)
    assert (
        torch.equal(target["merged_mask"][:SIZE], masks["red"][0])
        and not target["merged_mask"][SIZE:].any()
    )
    assert target["empty"] is False
    bad = dict(x, empty=True)
    with pytest.raises(ValueError, match="marked empty"):
        model.prepare_targets([bad], (SIZE, SIZE))
    with pytest.raises(ValueError, match="instances"):
        model.prepare_targets([{"image": image}], (SIZE, SIZE))


# ----------------------------------------------------------------------------- inference contract


def test_inference_output_contract(model, model_input):
    model.eval()
    image, _ = draw_scene(0)
    model.instance_score_threshold = 0.0  # list every query, to check sorting and the cap
    model.max_instances = 4
    # An untrained model may call this expression "no target" (then no instances are listed):
    # whether it does depends on what earlier tests did to the shared model, so rule it out.
    model.no_target_threshold = 1.0
    try:
        (out,) = model([model_input(model, image, "the red square", height=80, width=96)])
    finally:
        model.instance_score_threshold, model.max_instances, model.no_target_threshold = (
            0.5,
            10,
            0.5,
        )
    assert set(out) == {"ref_seg", "ref_seg_input", "nt_prob", "instances"}
    assert out["ref_seg"].shape == (80, 96) and out["ref_seg_input"].shape == (SIZE, SIZE)
    assert (
        out["ref_seg"].dtype == torch.float32
        and 0 <= out["ref_seg"].min()
        and out["ref_seg"].max() <= 1
    )
    assert out["nt_prob"].dim() == 0 and 0 <= out["nt_prob"].item() <= 1
    instances = out["instances"]
    assert instances.image_size == (80, 96) and len(instances) == 4
    assert instances.pred_masks.dtype == torch.bool and instances.pred_masks.shape == (4, 80, 96)
    assert torch.all(instances.scores[:-1] >= instances.scores[1:])
    weights = instances.token_weights
    valid = int(model.text_encoder.tokenize(["the red square"])["attention_mask"].sum())
    assert weights.shape == (4, MAX_TOKENS)
    assert (
        torch.allclose(weights.sum(1), torch.ones(4), atol=1e-5) and (weights[:, valid:] == 0).all()
    )


def test_ref_seg_is_the_input_size_map_when_sizes_agree(model, model_input):
    model.eval()
    image, _ = draw_scene(0)
    (out,) = model([model_input(model, image, "the red square", height=SIZE, width=SIZE)])
    assert torch.allclose(out["ref_seg"], out["ref_seg_input"], atol=1e-6)


def test_no_target_threshold_empties_the_answer(model, model_input):
    model.eval()
    image, _ = draw_scene(0)
    x = model_input(model, image, "the red square")
    try:
        model.no_target_threshold = -1.0  # every expression is called no-target
        (out,) = model([x])
        assert (
            not out["ref_seg"].any()
            and not out["ref_seg_input"].any()
            and len(out["instances"]) == 0
        )
        model.no_target_threshold, model.instance_score_threshold = 2.0, 0.0  # never no-target
        (out,) = model([x])
        assert out["ref_seg"].max() > 0 and len(out["instances"]) == 6
    finally:
        model.no_target_threshold, model.instance_score_threshold = 0.5, 0.5


def test_unpadded_sizes_are_cropped_back(model, model_input):
    model.eval()
    image = torch.randint(0, 255, (3, 60, 50), dtype=torch.uint8)  # padded to 64x64 inside
    (out,) = model([model_input(model, image, "the red square", height=120, width=100)])
    assert out["ref_seg_input"].shape == (60, 50) and out["ref_seg"].shape == (120, 100)


def test_grouped_inference_equals_one_expression_at_a_time(model, model_input):
    model.eval()
    image_a, _ = draw_scene(0)
    image_b, _ = draw_scene(1)
    batch = [
        model_input(model, image_a, "the red square", file_name="a.png"),
        model_input(model, image_b, "both blue circles", file_name="b.png", height=64, width=64),
        model_input(model, image_a.clone(), "all yellow things", file_name="a.png"),
        model_input(model, image_b, "the purple cone", file_name="a.png"),  # same name, other image
    ]
    representatives, image_index = model.group_by_image(batch)
    assert representatives == [0, 1, 3] and image_index.tolist() == [0, 1, 0, 2]

    calls = []
    hook = model.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        grouped = model(batch)
        assert calls == [3]  # one backbone pass over the three distinct images
        single = [model([x])[0] for x in batch]
    finally:
        hook.remove()
    for a, b in zip(grouped, single):
        assert torch.allclose(a["ref_seg"], b["ref_seg"], atol=1e-5)
        assert torch.allclose(a["nt_prob"], b["nt_prob"], atol=1e-6)
        assert torch.equal(a["instances"].pred_masks, b["instances"].pred_masks)
        assert torch.allclose(a["instances"].token_weights, b["instances"].token_weights, atol=1e-5)


def test_raw_sentences_are_tokenised(model, model_input):
    model.eval()
    image, _ = draw_scene(0)
    tokenized = model_input(model, image, "both blue circles")
    as_dict = model_input(model, image, "both blue circles", tokenized=False)
    as_string = dict(as_dict, sentence="both blue circles")
    outs = model([tokenized, as_dict, as_string])
    for other in outs[1:]:
        assert torch.allclose(outs[0]["ref_seg"], other["ref_seg"], atol=1e-6)
    with pytest.raises(ValueError, match="sentence"):
        model([{"image": image}])


def test_encode_images_and_decode_expressions_for_a_demo(model):
    model.eval()
    image, _ = draw_scene(0)
    encoded = model.text_encoder.tokenize(["the red square", "both blue circles"])
    with torch.no_grad():
        visual = model.encode_images([{"image": image}])
        outputs = model.decode_expressions(
            visual, torch.tensor([0, 0]), encoded["input_ids"], encoded["attention_mask"]
        )
    assert (
        visual.mask_features.shape == (1, 32, SIZE // 4, SIZE // 4)
        and len(visual.multi_scale_features) == 3
    )
    assert outputs["predictions"][-1]["merged_logits"].shape == (2, SIZE // 4, SIZE // 4)
    assert outputs["no_target_logits"].shape == (2,)
    with pytest.raises(ValueError, match="no tokens"):
        model.decode_expressions(
            visual,
            torch.tensor([0]),
            encoded["input_ids"][:1],
            torch.zeros(1, MAX_TOKENS, dtype=torch.long),
        )
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        model.encode_images([{"image": image[:1]}])


@pytest.mark.parametrize(
    "override",
    [
        {"DECODER": "M2F"},
        {"DECODER": "RELA", "INSTANCE_SUPERVISION": "standard"},
        {
            "AGGREGATION": "THRESHOLD",
            "NO_TARGET_INPUT": "MEAN_QUERIES",
            "INSTANCE_SUPERVISION": "none",
        },
        {"AGGREGATION": "AIA_NO_PRELU", "NO_TARGET_INPUT": "TSEN", "DEEP_SUPERVISION": False},
        {"MERGED_LOSS_ON_LAST_ONLY": True, "SCORE_LOSS_NORMALIZATION": "mean_over_queries"},
    ],
)
def test_ablation_settings_train_and_infer(tiny_cfg, override, model_input):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(**override))
    model.train()
    losses = model(training_batch(model, model_input))
    assert all(torch.isfinite(v) for v in losses.values())
    assert ("loss_phrase" in losses) == (override.get("INSTANCE_SUPERVISION", "phrase") == "phrase")
    assert ("loss_merged_0" in losses) == (
        override.get("DEEP_SUPERVISION", True)
        and not override.get("MERGED_LOSS_ON_LAST_ONLY", False)
    )
    assert ("loss_score_0" in losses) == (
        override.get("DEEP_SUPERVISION", True) and override.get("INSTANCE_SUPERVISION") != "none"
    )
    sum(losses.values()).backward()
    model.eval()
    assert model(training_batch(model, model_input)[:1])[0]["ref_seg"].shape == (80, 96)


# ----------------------------------------------------------------------------- configs


def test_r50_config_builds_with_detectron2_resnet(tiny_text_encoder, model_input):
    cfg = add_instalign_config(get_cfg())
    cfg.merge_from_file(
        os.path.join(os.path.dirname(__file__), "..", "configs", "grefcoco", "instalign_R50.yaml")
    )
    cfg.MODEL.DEVICE = "cpu"
    (
        cfg.MODEL.TEXT_ENCODER.NAME,
        cfg.MODEL.TEXT_ENCODER.PRETRAINED,
        cfg.MODEL.TEXT_ENCODER.MAX_TOKENS,
    ) = (tiny_text_encoder, False, MAX_TOKENS)
    cfg.MODEL.RESNETS.DEPTH = 18  # the same builder; a smaller depth keeps the test fast
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS, cfg.MODEL.INSTALIGN.DEC_LAYERS = 1, 2
    model = build_model(cfg).eval()
    assert type(model) is InstAlign and model.input_format == "BGR"
    assert torch.allclose(model.pixel_mean.flatten(), torch.tensor([103.530, 116.280, 123.675]))
    image, _ = draw_scene(0)
    (out,) = model([model_input(model, image, "the red square")])
    assert out["ref_seg"].shape == (80, 96) and torch.isfinite(out["ref_seg"]).all()


# ----------------------------------------------------------------------------- learning


@pytest.mark.slow
def test_tiny_model_overfits_one_batch(tiny_cfg, model_input):
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    model.train()
    batch = training_batch(model, model_input)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for _ in range(300):
        losses = model(batch)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append(total.item())
    first, last = sum(history[:5]) / 5, sum(history[-10:]) / 10
    assert last * 5 <= first, (first, last)
    model.eval()
    outs = model(batch)
    # The memorised answers: the red square found, the no-target expressions recognised.
    red = batch[0]["gt_mask_merged"]
    iou = ((outs[0]["ref_seg_input"] > 0.5) & red).sum() / (
        (outs[0]["ref_seg_input"] > 0.5) | red
    ).sum()
    assert iou > 0.5
    assert outs[2]["nt_prob"] > 0.5 and outs[3]["nt_prob"] > 0.5
    assert outs[0]["nt_prob"] < 0.5 and outs[1]["nt_prob"] < 0.5
