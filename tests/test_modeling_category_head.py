"""The auxiliary category head and its loss on the matched queries (MODEL.INSTALIGN.CATEGORY_CLASSES)."""

import os

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from test_model_instalign import training_batch
from test_modeling_decoder import LAYERS, MASK_DIM, QUERIES, inputs
from test_modeling_decoder import tiny_cfg as tiny_decoder_cfg
from test_modeling_losses import _criterion, _single_prediction_outputs

import instalign_d2.instalign_model  # noqa: F401  (registers InstAlign)
from instalign_d2.config import add_instalign_config
from instalign_d2.data.datasets.synthetic import (
    SHAPE_COLOUR_CLASSES,
    SHAPE_COLOUR_SUFFIX,
    shape_colour_category,
)
from instalign_d2.modeling.transformer_decoder import build_transformer_decoder
from instalign_d2.modeling.transformer_decoder.category_head import QueryCategoryHead
from instalign_d2.synthetic.generator import CATEGORY_IDS
from instalign_d2.synthetic.scene import COLOURS, SHAPES

SIZE = 16


def _known_match(category_logits, classes=(3,)):
    """One image, one target covering the left half; query 0 predicts it perfectly, query 1 the
    background: the matcher assigns query 0."""
    gt = torch.zeros(1, SIZE, SIZE, dtype=torch.bool)
    gt[0, :, : SIZE // 2] = True
    perfect = torch.where(gt[0], 30.0, -30.0)
    outputs = _single_prediction_outputs(
        torch.tensor([[1.0, -1.0]]),
        torch.stack([perfect, -perfect])[None],
        torch.randn(1, 2, 8),
        torch.randn(1, 5, 8),
        torch.tensor([[False, False, False, True, True]]),
        perfect[None],
        torch.tensor([-3.0]),
    )
    outputs["predictions"][0]["category_logits"] = category_logits
    target = {
        "masks": gt,
        "merged_mask": gt[0],
        "empty": False,
        "classes": torch.tensor(classes),
    }
    return outputs, [target]


def test_category_loss_is_the_cross_entropy_of_the_matched_query_only():
    logits = torch.tensor([[[0.1, 0.2, -0.3, 1.2, 0.0, 0.5], [9.0, -9.0, 9.0, -9.0, 9.0, 9.0]]])
    outputs, targets = _known_match(logits)
    losses = _criterion(category_weight=2.0)(outputs, targets)
    expected = 2.0 * F.cross_entropy(logits[0, :1], torch.tensor([3]))  # over 1 instance
    assert losses["loss_category"].item() == pytest.approx(expected.item(), rel=1e-6)

    # The unmatched query's logits do not matter; the matched one's label does.
    other = logits.clone()
    other[0, 1] = torch.randn(6)
    assert _criterion(category_weight=2.0)(*_known_match(other))["loss_category"].item() == (
        pytest.approx(expected.item(), rel=1e-6)
    )
    relabelled = _criterion(category_weight=2.0)(*_known_match(logits, classes=(1,)))
    assert relabelled["loss_category"].item() == pytest.approx(
        2.0 * F.cross_entropy(logits[0, :1], torch.tensor([1])).item(), rel=1e-6
    )
    # The weight scales it; the Eq. 7 terms do not change with it.
    half = _criterion(category_weight=1.0)(outputs, targets)
    assert half["loss_category"].item() == pytest.approx(expected.item() / 2, rel=1e-6)
    assert half["loss_score"].item() == pytest.approx(losses["loss_score"].item(), rel=1e-6)


def test_without_category_logits_there_is_no_category_loss():
    outputs, targets = _known_match(torch.zeros(1, 2, 6))
    del outputs["predictions"][0]["category_logits"]
    assert "loss_category" not in _criterion()(outputs, targets)
    del targets[0]["classes"]  # and the targets need no classes
    assert "loss_category" not in _criterion()(outputs, targets)


def test_category_loss_errors_name_the_fix():
    outputs, targets = _known_match(torch.zeros(1, 2, 4), classes=(4,))
    with pytest.raises(ValueError, match="CATEGORY_CLASSES above"):
        _criterion()(outputs, targets)
    outputs, targets = _known_match(torch.zeros(1, 2, 6))
    targets[0]["classes"] = None
    with pytest.raises(ValueError, match="instances.gt_classes"):
        _criterion()(outputs, targets)
    with pytest.raises(ValueError, match="at least 2"):
        QueryCategoryHead(8, 1)


def test_category_loss_of_a_batch_without_targets_is_zero_and_connected():
    logits = torch.randn(1, 2, 6, requires_grad=True)
    outputs, targets = _known_match(logits)
    targets = [
        {
            "masks": torch.zeros(0, SIZE, SIZE, dtype=torch.bool),
            "merged_mask": torch.zeros(SIZE, SIZE, dtype=torch.bool),
            "empty": True,
            "classes": torch.zeros(0, dtype=torch.long),
        }
    ]
    loss = _criterion()(outputs, targets)["loss_category"]
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() == 0


def test_decoder_names_categories_on_every_prediction_only_when_asked():
    features, mask_features, text, pad = inputs()
    cfg = tiny_decoder_cfg()
    cfg.MODEL.INSTALIGN.CATEGORY_CLASSES = 6
    torch.manual_seed(0)
    decoder = build_transformer_decoder(cfg, 24, MASK_DIM, text.shape[-1])
    predictions = decoder(features, mask_features, text, pad)["predictions"]
    assert len(predictions) == LAYERS + 1
    for p in predictions:
        assert p["category_logits"].shape == (2, QUERIES, 6)
        expected = decoder.category_head.classifier(decoder.category_head.norm(p["queries"]))
        assert torch.allclose(p["category_logits"], expected)
    plain = build_transformer_decoder(tiny_decoder_cfg(), 24, MASK_DIM, text.shape[-1])
    assert plain.category_head is None
    assert all(
        "category_logits" not in p for p in plain(features, mask_features, text, pad)["predictions"]
    )


def test_the_model_trains_the_head_through_the_matched_queries(tiny_cfg, model_input):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(CATEGORY_CLASSES=3)).train()
    batch = training_batch(model, model_input)
    for x in batch:  # the two with targets: category 2
        x["instances"].gt_classes = torch.full_like(x["instances"].gt_classes, 2)
    losses = model(batch)
    keys = {k for k in losses if k.startswith("loss_category")}
    assert keys == {"loss_category"} | {f"loss_category_{k}" for k in range(3)}  # K = 3 blocks
    assert all(torch.isfinite(losses[k]) and losses[k] > 0 for k in keys)
    sum(losses[k] for k in keys).backward()
    head = model.transformer_decoder.category_head
    assert head.classifier.weight.grad.abs().sum() > 0
    assert model.transformer_decoder.query_feat.weight.grad.abs().sum() > 0
    # Inference does not read the head: its answer is the same whatever the head's weights.
    model.eval()
    with torch.no_grad():
        before = model(batch[:1])[0]["ref_seg"]
        torch.nn.init.normal_(head.classifier.weight)
        assert torch.equal(model(batch[:1])[0]["ref_seg"], before)


def test_the_tiny_config_names_every_category_of_its_train_split(repo_root):
    """The tiny config trains on the (shape, colour) split, and its head has a class for every
    category id that split writes, and no more than it needs."""
    cfg = add_instalign_config(get_cfg())
    cfg.merge_from_file(os.path.join(repo_root, "configs", "synthetic", "instalign_tiny.yaml"))
    assert tuple(cfg.DATASETS.TRAIN) == (f"synthetic_gres_train{SHAPE_COLOUR_SUFFIX}",)
    ids = sorted(shape_colour_category(shape, colour) for shape in SHAPES for colour in COLOURS)
    assert ids == list(range(1, len(SHAPES) * len(COLOURS) + 1))  # one id per pair, 0 unused
    assert cfg.MODEL.INSTALIGN.CATEGORY_CLASSES == SHAPE_COLOUR_CLASSES == ids[-1] + 1
    # The plain train split names the five shapes alone, ids 1..5.
    assert sorted(CATEGORY_IDS.values()) == list(range(1, len(SHAPES) + 1))
