"""Fixtures of the tools' tests."""

import pytest


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
