"""What a synthetic GRES dataset is made of: its parameters (one dataclass) and its folder layout.

Every consumer — the generator and its command line, ``train_net.py``, the backbone
pre-training, the tools — builds :class:`SyntheticParams` (from the config with
:meth:`SyntheticParams.from_config`, or from plain arguments), so each default is written once.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, Optional, Tuple

from instalign_d2.synthetic.expressions import DEFAULT_KIND_WEIGHTS, KINDS
from instalign_d2.utils.paths import datasets_root

GENERATOR_VERSION = 3  # bump when the output for given parameters changes

SYNTHETIC_DIRNAME = "synthetic_gres"
SYNTHETIC_SPLITS = ("train", "val", "test")
REFS_FILE = "grefs(unc).json"
INSTANCES_FILE = "instances.json"
IMAGES_DIR = "images"
TEXT_ENCODER_DIR = "text_encoder"
MARKER_FILE = (
    "generator.json"  # parameters and statistics; written last: its presence means "complete"
)

SYNTHETIC_LAYOUT = """\
  synthetic_gres/          written by: python -m instalign_d2.synthetic --root <this folder>
    grefs(unc).json        (train_net.py writes it itself when absent)
    instances.json
    images/{train,val,test}/*.png
    text_encoder/
    generator.json"""


@dataclasses.dataclass(frozen=True)
class SyntheticParams:
    """The parameters that determine a generated dataset, byte for byte.

    Attributes:
        num_train_images, num_val_images, num_test_images: images per split.
        image_size: side of the square images in pixels.
        seed: the output is a function of the parameters; the same seed gives the same bytes.
        expressions_per_image: expressions drawn per image (repeats are dropped, so a few images
            get one less).
        kind_weights: shares of single / multi / no-target expressions.
    """

    num_train_images: int = 3000
    num_val_images: int = 300
    num_test_images: int = 300
    image_size: int = 160
    seed: int = 0
    expressions_per_image: int = 6
    kind_weights: Tuple[float, ...] = DEFAULT_KIND_WEIGHTS

    def __post_init__(self):
        # Canonical types, so that params from a YAML file, the CLI or code compare equal.
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "kind_weights":
                value = tuple(float(w) for w in value)
            else:
                value = int(value)
            object.__setattr__(self, field.name, value)
        for split in SYNTHETIC_SPLITS:
            if self.num_images(split) < 0:
                raise ValueError(
                    f"num_{split}_images={self.num_images(split)}: expected a count >= 0"
                )
        if self.image_size < 32:
            raise ValueError(
                f"image_size={self.image_size}: expected at least 32 pixels "
                "(shapes must stay recognisable)"
            )
        weights = self.kind_weights
        if len(weights) != len(KINDS) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(
                f"kind_weights={list(weights)}: expected {len(KINDS)} non-negative weights for {KINDS}"
            )

    @classmethod
    def from_config(cls, cfg) -> "SyntheticParams":
        """From ``cfg.DATASETS.SYNTHETIC`` (its seed is the config's ``SEED`` when that is >= 0)."""
        synthetic = cfg.DATASETS.SYNTHETIC
        return cls(
            num_train_images=synthetic.NUM_TRAIN_IMAGES,
            num_val_images=synthetic.NUM_VAL_IMAGES,
            num_test_images=synthetic.NUM_TEST_IMAGES,
            image_size=synthetic.IMAGE_SIZE,
            seed=synthetic.SEED,
            expressions_per_image=synthetic.EXPRESSIONS_PER_IMAGE,
            kind_weights=tuple(synthetic.KIND_WEIGHTS),
        )

    def num_images(self, split: str) -> int:
        return getattr(self, f"num_{split}_images")

    def to_record(self) -> Dict[str, object]:
        """The form written to ``generator.json`` (with the generator's version)."""
        record = {"generator_version": GENERATOR_VERSION, **dataclasses.asdict(self)}
        record["kind_weights"] = list(self.kind_weights)
        return record

    @classmethod
    def add_arguments(cls, parser) -> None:
        """Command-line flags for every field, with the dataclass's defaults."""
        for field in dataclasses.fields(cls):
            flag = "--" + field.name.replace("_", "-")
            if field.name == "kind_weights":
                parser.add_argument(flag, type=float, nargs=len(KINDS), default=field.default)
            else:
                parser.add_argument(flag, type=int, default=field.default)

    @classmethod
    def from_arguments(cls, args) -> "SyntheticParams":
        return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)})


def synthetic_root() -> str:
    """``$DETECTRON2_DATASETS/synthetic_gres`` (read now, not at import)."""
    return os.path.join(datasets_root(), SYNTHETIC_DIRNAME)


def synthetic_paths(root: str) -> Dict[str, str]:
    """The files of a generated dataset in ``root``."""
    return {
        "dataset_root": root,
        "refs_file": os.path.join(root, REFS_FILE),
        "instances_file": os.path.join(root, INSTANCES_FILE),
        "image_root": os.path.join(root, IMAGES_DIR),
        "text_encoder": os.path.join(root, TEXT_ENCODER_DIR),
    }


def read_marker(root: str) -> Optional[Dict[str, object]]:
    """The generator's record in ``root`` (None when absent or unreadable: not a complete dataset)."""
    try:
        with open(os.path.join(root, MARKER_FILE), "r", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_instances(root: str) -> dict:
    """The ``instances.json`` of a generated dataset (all splits)."""
    with open(os.path.join(root, INSTANCES_FILE), encoding="utf-8") as f:
        return json.load(f)
