"""Fixtures shared by the test modules (no test module imports another)."""

import importlib.util
import os
import sys

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.structures import Instances

from instalign_d2.config import add_instalign_config
from instalign_d2.synthetic.text_encoder import write_local_text_encoder

# Tests use tiny models, where threads gain little; and when anything else runs beside pytest,
# OpenMP threads that spin-wait for a busy core make small ops hundreds of times slower.
torch.set_num_threads(1)

# train_net.py, demo/ and tools/ live at the repository root, outside the package.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for folder in (REPO_ROOT, os.path.join(REPO_ROOT, "demo")):
    if folder not in sys.path:
        sys.path.insert(0, folder)

TINY_IMAGE_SIZE = 64  # the tiny model's input side (INPUT.IMAGE_SIZE)
TINY_MAX_TOKENS = 12
TINY_CORPUS = (
    "the red square",
    "both blue circles",
    "the green triangle on the left",
    "all yellow things",
    "the small red circle and the blue square",
    "the purple cone",
)


def pytest_collection_modifyitems(config, items):
    """CUDA tests skip cleanly on machines without a GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def repo_root() -> str:
    return REPO_ROOT


@pytest.fixture(scope="session")
def load_tool():
    """``load_tool("probe_features")``: a script of ``tools/`` imported as a module."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(
            name, os.path.join(REPO_ROOT, "tools", f"{name}.py")
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there while it executes
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def tiny_corpus():
    return list(TINY_CORPUS)


@pytest.fixture(scope="session")
def tiny_max_tokens() -> int:
    return TINY_MAX_TOKENS


@pytest.fixture(scope="session")
def tiny_image_size() -> int:
    return TINY_IMAGE_SIZE


@pytest.fixture(scope="session")
def tiny_text_encoder(tmp_path_factory) -> str:
    """A 1-layer RoBERTa-style encoder with a BPE tokenizer of the tiny corpus (no download)."""
    return write_local_text_encoder(
        str(tmp_path_factory.mktemp("text") / "encoder"),
        list(TINY_CORPUS) * 4,
        vocab_size=300,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        intermediate_size=64,
        max_tokens=TINY_MAX_TOKENS,
    )


def build_tiny_cfg(text_encoder_dir: str, **instalign):
    """The config of a tiny InstAlign (timm's test model, C = 32, N = 6, K = 3) on the CPU."""
    cfg = add_instalign_config(get_cfg())
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.META_ARCHITECTURE = "InstAlign"
    cfg.MODEL.BACKBONE.NAME = "TimmBackbone"
    cfg.MODEL.TIMM.NAME = "test_efficientnet"  # timm's 80k-parameter test model, strides 4..32
    cfg.MODEL.TIMM.PRETRAINED_WEIGHTS = ""
    cfg.MODEL.TIMM.DROP_PATH_RATE = 0.0
    cfg.MODEL.TEXT_ENCODER.NAME = text_encoder_dir
    cfg.MODEL.TEXT_ENCODER.PRETRAINED = False
    cfg.MODEL.TEXT_ENCODER.MAX_TOKENS = TINY_MAX_TOKENS
    head = cfg.MODEL.SEM_SEG_HEAD
    head.CONVS_DIM, head.MASK_DIM, head.TRANSFORMER_ENC_LAYERS = 32, 32, 1
    head.DIM_FEEDFORWARD, head.NHEADS = 64, 4
    c = cfg.MODEL.INSTALIGN
    c.HIDDEN_DIM, c.NUM_OBJECT_QUERIES, c.DEC_LAYERS, c.NHEADS = 32, 6, 3, 4
    c.DIM_FEEDFORWARD, c.TRAIN_NUM_POINTS = 64, 256
    for key, value in instalign.items():
        c[key] = value
    cfg.INPUT.IMAGE_SIZE = TINY_IMAGE_SIZE
    return cfg


@pytest.fixture(scope="session")
def tiny_cfg(tiny_text_encoder):
    """``tiny_cfg(**MODEL.INSTALIGN overrides)`` or ``tiny_cfg(text_encoder_dir=..., ...)``."""

    def make(text_encoder_dir: str = tiny_text_encoder, **instalign):
        return build_tiny_cfg(text_encoder_dir, **instalign)

    return make


@pytest.fixture(scope="session")
def model_input():
    """``model_input(model, image, sentence, masks=(), file_name=..., height=..., width=...)``:
    one input of the tiny model as its dataset mapper makes it (masks at the input size, the
    sentence tokenised unless ``tokenized=False``); height and width are the original image's."""

    def make(
        model, image, sentence, masks=(), file_name="scene.png", height=80, width=96, tokenized=True
    ):
        size = TINY_IMAGE_SIZE
        instances = Instances((size, size))
        gt = torch.stack(list(masks)) if masks else torch.zeros(0, size, size, dtype=torch.bool)
        instances.gt_masks = gt
        instances.gt_classes = torch.zeros(len(gt), dtype=torch.long)
        x = {
            "image": image,
            "height": height,
            "width": width,
            "file_name": file_name,
            "image_id": 1,
            "instances": instances,
            "gt_mask_merged": gt.any(0) if len(gt) else torch.zeros(size, size, dtype=torch.bool),
            "empty": len(gt) == 0,
            "sentence": {"raw": sentence, "sent_id": 0, "ref_id": 0},
        }
        if tokenized:
            encoded = model.text_encoder.tokenize([sentence])
            x["input_ids"] = encoded["input_ids"][0]
            x["attention_mask"] = encoded["attention_mask"][0]
        return x

    return make
