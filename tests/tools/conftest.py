"""Fixtures of the tools' tests."""

from types import SimpleNamespace

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

import train_net


@pytest.fixture
def tiny_training_opts(tmp_path, monkeypatch):
    """Config KEY VALUE pairs that shrink the tiny synthetic config to a few 64-pixel images and a
    test-sized trunk, generated under this test's own DETECTRON2_DATASETS."""
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))
    return [
        "DATASETS.SYNTHETIC.NUM_TRAIN_IMAGES", "6",
        "DATASETS.SYNTHETIC.NUM_VAL_IMAGES", "2",
        "DATASETS.SYNTHETIC.NUM_TEST_IMAGES", "0",
        "DATASETS.SYNTHETIC.IMAGE_SIZE", "64",
        "INPUT.IMAGE_SIZE", "64",
        "MODEL.TIMM.NAME", "test_resnet",
        "SOLVER.IMS_PER_BATCH", "2",
    ]  # fmt: skip


@pytest.fixture
def tiny_checkpoint(load_tool, repo_root, tmp_path, tiny_training_opts):
    """A tiny model with random weights (seed 0) saved as a checkpoint, its dataset generated.

    ``cfg``, ``model`` (in eval mode), ``weights`` (the checkpoint's path) and ``config`` (the
    config written to a file, as a trained run leaves it).
    """
    opts = tiny_training_opts + ["MODEL.TIMM.SYNTHETIC_PRETRAIN.ITERATIONS", "0"]
    opts += ["MODEL.TIMM.PRETRAINED_WEIGHTS", ""]
    cfg = load_tool("profile_train_step").build_cfg(
        f"{repo_root}/configs/synthetic/instalign_tiny.yaml", opts
    )
    train_net.prepare_data(cfg)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model")
    config = tmp_path / "config.yaml"
    config.write_text(cfg.dump())
    return SimpleNamespace(
        cfg=cfg, model=model, weights=str(tmp_path / "model.pth"), config=str(config)
    )
