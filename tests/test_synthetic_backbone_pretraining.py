"""Backbone pre-training on the synthetic objects' attributes: pooling, learning, the file it
writes (loadable by TimmBackbone, made once, made again for other settings, kept per settings),
and the config checks and eval-only shortcut around it."""

import json
import os
import re
import shutil

import pytest
import torch
from detectron2.config import get_cfg

import train_net
from instalign_d2 import add_instalign_config
from instalign_d2.engine.checks import ConfigError, check_config
from instalign_d2.modeling.backbone import TimmBackbone
from instalign_d2.synthetic import backbone_pretraining as sp
from instalign_d2.synthetic.generator import generate_synthetic_gres
from instalign_d2.synthetic.params import SyntheticParams
from instalign_d2.synthetic.scene import ATTRIBUTE_VALUES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "synthetic", "instalign_tiny.yaml")


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pretrain") / "synthetic_gres")
    params = SyntheticParams(
        seed=3, num_train_images=24, num_val_images=8, num_test_images=2, image_size=64
    )
    generate_synthetic_gres(root, params, workers=1)
    return root


def tiny_cfg(weights_path, iterations=30):
    cfg = add_instalign_config(get_cfg())
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list(
        [
            "MODEL.TIMM.NAME",
            "test_resnet",
            "INPUT.IMAGE_SIZE",
            "64",
            "MODEL.TIMM.PRETRAINED_WEIGHTS",
            str(weights_path),
            "MODEL.TIMM.SYNTHETIC_PRETRAIN.ITERATIONS",
            str(iterations),
            "MODEL.TIMM.SYNTHETIC_PRETRAIN.IMS_PER_BATCH",
            "8",
        ]
    )
    return cfg


def test_pooling_averages_the_features_under_each_mask():
    features = torch.zeros(2, 4, 4)
    features[0, :2, :2] = 1.0  # channel 0 lights up the top-left quarter only
    features[1] = 5.0
    masks = torch.zeros(3, 8, 8)
    masks[0, :4, :4] = 1  # an object covering that quarter, at twice the resolution
    masks[1, :4, :8] = 1  # one covering as much of the neighbouring quarter, where channel 0 is 0
    masks[2, 7, 7] = 1  # one smaller than a feature cell still gets that cell's features
    pooled = sp.pool_over_masks(features, masks)
    assert torch.allclose(pooled, torch.tensor([[1.0, 5.0], [0.5, 5.0], [0.0, 5.0]]))


def test_objects_come_with_their_masks_and_attributes(dataset_root):
    data = sp.load_object_attributes(dataset_root, "train", 32, max_images=5)
    assert data.images.shape == (5, 3, 32, 32) and data.images.dtype == torch.uint8
    with open(os.path.join(dataset_root, "instances.json")) as f:
        instances = json.load(f)
    first = [a for a in instances["annotations"] if a["image_id"] == instances["images"][0]["id"]]
    assert data.labels[0].tolist() == [
        [ATTRIBUTE_VALUES[k].index(a[k]) for k in sp.ATTRIBUTES] for a in first
    ]
    # Area-resized masks keep each object's share of the image.
    for mask, annotation in zip(data.masks[0], first):
        assert float(mask.sum()) * (64 / 32) ** 2 == pytest.approx(annotation["area"], rel=0.02)


def test_pretraining_teaches_the_trunk_the_attributes(dataset_root):
    cfg = tiny_cfg("unused")
    train_set = sp.load_object_attributes(dataset_root, "train", 64)
    val_set = sp.load_object_attributes(dataset_root, "val", 64)
    normalize = sp._Normalize(cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD)

    def colour_accuracy_on_val(data):
        torch.manual_seed(0)
        backbone = TimmBackbone(**{**TimmBackbone.from_config(cfg), "pretrained_weights": ""})
        classifiers = sp.pretrain_backbone(
            backbone,
            data,
            iterations=40,
            ims_per_batch=8,
            base_lr=3e-3,
            pixel_mean=cfg.MODEL.PIXEL_MEAN,
            pixel_std=cfg.MODEL.PIXEL_STD,
        )
        accuracy = sp.attribute_accuracy(backbone, classifiers, normalize, val_set)
        return max(acc["colour"] for acc in accuracy.values())

    chance = 100 / len(ATTRIBUTE_VALUES["colour"])
    # Colour is the easiest attribute: a trunk that learned anything reads it on unseen images.
    real = colour_accuracy_on_val(train_set)
    assert real > 80 > 3 * chance
    # With the labels shuffled between objects the same budget teaches nothing that transfers.
    generator = torch.Generator().manual_seed(1)
    permutation = torch.randperm(train_set.num_objects, generator=generator)
    shuffled = torch.cat(train_set.labels)[permutation].split([len(x) for x in train_set.labels])
    fake = colour_accuracy_on_val(
        sp.ObjectAttributeSet(train_set.images, train_set.masks, list(shuffled))
    )
    assert fake < 60


def test_weights_are_made_once_loaded_by_the_backbone_made_again_for_other_settings_and_kept(
    dataset_root, tmp_path, monkeypatch
):
    weights = tmp_path / "backbones" / "test_resnet.pth"
    cfg = tiny_cfg(weights, iterations=3)
    loaded_first = sp.ensure_synthetic_pretrained_backbone(cfg, dataset_root)
    # The run loads the copy named by its settings, which no other run rewrites.
    assert os.path.dirname(loaded_first) == str(weights) + ".by_settings"
    assert open(loaded_first, "rb").read() == weights.read_bytes()
    recorded = json.loads((tmp_path / "backbones" / "test_resnet.pth.json").read_text())
    assert recorded["settings"]["iterations"] == 3 and set(recorded["val_accuracy"]) == {
        "res2",
        "res3",
        "res4",
        "res5",
    }

    made_first = weights.read_bytes()
    saved = torch.load(weights, weights_only=True)
    backbone = TimmBackbone(
        **TimmBackbone.from_config(cfg)
    )  # loads PRETRAINED_WEIGHTS through timm
    trunk = backbone.body.state_dict()
    assert trunk and all(torch.equal(trunk[k], saved[k]) for k in trunk)

    def fail(*args, **kwargs):
        raise AssertionError("pre-trained again although nothing changed")

    with monkeypatch.context() as m:
        m.setattr(sp, "pretrain_backbone", fail)
        sp.ensure_synthetic_pretrained_backbone(cfg, dataset_root)

    before = weights.stat().st_mtime_ns
    loaded_second = sp.ensure_synthetic_pretrained_backbone(
        tiny_cfg(weights, iterations=4), dataset_root
    )
    assert weights.stat().st_mtime_ns != before
    # A run of other settings (another seed started beside the first) rewrote the main file; the
    # copy the first run loads still holds the first trunk.
    assert loaded_second != loaded_first and weights.read_bytes() != made_first
    assert open(loaded_first, "rb").read() == made_first
    # A recorded config that names the stored copy reuses it as it is, and only for its settings.
    with monkeypatch.context() as m:
        m.setattr(sp, "pretrain_backbone", fail)
        assert (
            sp.ensure_synthetic_pretrained_backbone(
                tiny_cfg(loaded_first, iterations=3), dataset_root
            )
            == loaded_first
        )
        with pytest.raises(
            ValueError, match=re.escape(f"name the main file beside its store ({weights})")
        ):
            sp.ensure_synthetic_pretrained_backbone(
                tiny_cfg(loaded_first, iterations=4), dataset_root
            )
    assert not os.path.exists(loaded_first + ".by_settings")
    assert (
        json.loads((tmp_path / "backbones" / "test_resnet.pth.json").read_text())["settings"][
            "iterations"
        ]
        == 4
    )

    # A run for new settings that dies while pre-training leaves no record that vouches for the
    # weights in place.
    with monkeypatch.context() as m:
        m.setattr(sp, "pretrain_backbone", fail)
        with pytest.raises(AssertionError):
            sp.ensure_synthetic_pretrained_backbone(tiny_cfg(weights, iterations=5), dataset_root)
    assert sp.recorded_settings(str(weights)) is None

    # Back to the first settings (a run of another seed, then this one again): the weights made
    # for them come back from the store, byte for byte, without pre-training again.
    with monkeypatch.context() as m:
        m.setattr(sp, "pretrain_backbone", fail)
        sp.ensure_synthetic_pretrained_backbone(cfg, dataset_root)
    assert weights.read_bytes() == made_first
    assert (
        json.loads((tmp_path / "backbones" / "test_resnet.pth.json").read_text())["settings"][
            "iterations"
        ]
        == 3
    )
    assert len(list((tmp_path / "backbones" / "test_resnet.pth.by_settings").glob("*.pth"))) == 2

    # Weights without their settings file (a run killed between the two writes) are not trusted:
    # the store's copy replaces them, and without that copy they are made again.
    (tmp_path / "backbones" / "test_resnet.pth.json").unlink()
    weights.write_bytes(b"half-written")
    with monkeypatch.context() as m:
        m.setattr(sp, "pretrain_backbone", fail)
        sp.ensure_synthetic_pretrained_backbone(cfg, dataset_root)
    assert weights.read_bytes() == made_first
    (tmp_path / "backbones" / "test_resnet.pth.json").unlink()
    shutil.rmtree(tmp_path / "backbones" / "test_resnet.pth.by_settings")
    calls = []
    with monkeypatch.context() as m:
        m.setattr(sp, "pretrain_backbone", lambda *a, **k: calls.append(1) or fail())
        with pytest.raises(AssertionError):
            sp.ensure_synthetic_pretrained_backbone(cfg, dataset_root)
    assert calls == [1]


def test_config_checks_around_pretraining(tmp_path):
    cfg = tiny_cfg(tmp_path / "not_yet.pth")
    check_config(cfg)  # a file that pre-training will make need not exist
    with pytest.raises(
        ConfigError, match="MODEL.TIMM.SYNTHETIC_PRETRAIN.ITERATIONS > 0 writes its backbone"
    ):
        check_config(tiny_cfg(""))
    cfg.DATASETS.TRAIN = ("grefcoco_unc_train",)
    with pytest.raises(ConfigError, match="pre-trains on the synthetic dataset"):
        check_config(cfg)
    cfg = tiny_cfg(tmp_path / "not_yet.pth", iterations=0)
    with pytest.raises(ConfigError, match="PRETRAINED_WEIGHTS=.*not_yet.pth: no such file"):
        check_config(cfg)


def test_eval_only_neither_reads_nor_makes_the_initial_backbone(tmp_path):
    argv = ["--config-file", CONFIG, "--eval-only", "MODEL.WEIGHTS", str(tmp_path / "model.pth")]
    cfg = train_net.build_config(train_net.default_argument_parser().parse_args(argv))
    assert (
        cfg.MODEL.TIMM.PRETRAINED_WEIGHTS == ""
        and cfg.MODEL.TIMM.SYNTHETIC_PRETRAIN.ITERATIONS == 0
    )
