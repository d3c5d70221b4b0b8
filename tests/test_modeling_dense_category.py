"""The dense category loss (MODEL.INSTALIGN.DENSE_CATEGORY_WEIGHT): the head's cross-entropy at
the cells' centres, its checks, and the meta-architecture's use of the mapper's category maps."""

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from test_model_instalign import SIZE, draw_scene, training_batch

from instalign_d2.modeling.dense_category import IGNORE_INDEX, DenseCategoryHead


def test_the_loss_is_the_weighted_cross_entropy_at_each_cells_centre():
    torch.manual_seed(0)
    head = DenseCategoryHead(mask_dim=4, num_classes=5, weight=2.0)
    mask_features = torch.randn(2, 4, 3, 3, requires_grad=True)
    category_maps = torch.randint(0, 5, (2, 12, 12))
    category_maps[1, :, 8:] = IGNORE_INDEX  # padding on the right of the second image
    loss = head.loss(mask_features, category_maps)
    # each 4 x 4 block of pixels is one cell, named by its centre pixel (2, 2)
    at_centres = category_maps[:, 2::4, 2::4]
    logits = F.conv2d(mask_features, head.classifier.weight, head.classifier.bias)
    log_p = logits.log_softmax(dim=1)
    picked = [
        -log_p[i, at_centres[i, y, x], y, x]
        for i in range(2)
        for y in range(3)
        for x in range(3)
        if at_centres[i, y, x] != IGNORE_INDEX
    ]
    assert len(picked) == 9 + 6  # the padded column of cells is left out
    assert loss.item() == pytest.approx(2.0 * torch.stack(picked).mean().item(), rel=1e-5)
    loss.backward()
    assert mask_features.grad.abs().sum() > 0


def test_categories_beyond_the_head_and_too_few_classes_are_named():
    head = DenseCategoryHead(mask_dim=4, num_classes=5, weight=1.0)
    with pytest.raises(
        ValueError, match="category id 7 is not below MODEL.INSTALIGN.CATEGORY_CLASSES=5"
    ):
        head.loss(torch.zeros(1, 4, 2, 2), torch.full((1, 8, 8), 7))
    with pytest.raises(ValueError, match="CATEGORY_CLASSES=1"):
        DenseCategoryHead(mask_dim=4, num_classes=1, weight=1.0)


def _with_category_maps(batch):
    """The training batch with the category map the mapper would give each image: each object's
    mask painted with a category of its colour (red 1, blue 2, green 3)."""
    for x in batch:
        image_seed = 1 if x["file_name"] == "other.png" else 0
        _, masks = draw_scene(image_seed)
        category_map = torch.zeros(SIZE, SIZE, dtype=torch.uint8)
        for category, name in enumerate(("red", "blue", "green"), start=1):
            for mask in masks[name]:
                category_map[mask] = category
        x["category_map"] = category_map
    return batch


def test_training_adds_the_dense_loss_of_each_image_once(tiny_cfg, model_input):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(CATEGORY_CLASSES=4, DENSE_CATEGORY_WEIGHT=2.0))
    model.train()
    batch = _with_category_maps(training_batch(model, model_input))
    losses = model(batch)
    assert "loss_dense_category" in losses and torch.isfinite(losses["loss_dense_category"])
    # the loss of the two distinct images, recomputed from their visual features
    torch.manual_seed(0)
    features = model.encode_images([batch[0], batch[2]]).mask_features
    maps = torch.stack([batch[0]["category_map"], batch[2]["category_map"]]).long()
    expected = model.dense_category_head.loss(features, maps)
    assert losses["loss_dense_category"].item() == pytest.approx(expected.item(), rel=1e-5)
    sum(losses.values()).backward()
    assert model.dense_category_head.classifier.weight.grad.abs().sum() > 0
    # without the maps, one line says where they come from
    for x in batch:
        del x["category_map"]
    with pytest.raises(ValueError, match="image_annotations.*synthetic_gres_train_shape_colour"):
        model(batch)


def test_the_head_is_off_by_default_and_unused_in_inference(tiny_cfg, model_input):
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    assert model.dense_category_head is None
    model.train()
    assert "loss_dense_category" not in model(training_batch(model, model_input))
    torch.manual_seed(0)
    with_head = build_model(tiny_cfg(CATEGORY_CLASSES=4, DENSE_CATEGORY_WEIGHT=2.0))
    with_head.eval()
    batch = training_batch(with_head, model_input)[:1]  # no category map: inference needs none
    assert with_head(batch)[0]["ref_seg"].shape == (80, 96)
