"""Checks that run before anything is written to OUTPUT_DIR, so that a wrong path or name stops
the run at once with one line that names it and says how to fix it."""

from __future__ import annotations

import os
from typing import Iterable

from detectron2.data import DatasetCatalog

from instalign_d2.data import checked
from instalign_d2.data.datasets.errors import DatasetLayoutError
from instalign_d2.utils.paths import datasets_root, expand_path
from instalign_d2.utils.tokenizer import TextEncoderNotFoundError, resolve_text_encoder

from .errors import ConfigError
from .image_size_schedule import ImageSizeSchedule

__all__ = ["ConfigError", "check_config", "check_config_file", "check_datasets"]


def check_config_file(path: str) -> None:
    if not path:
        raise ConfigError(
            "--config-file is required, e.g. --config-file configs/synthetic/instalign_tiny.yaml"
        )
    if not os.path.isfile(path):
        raise ConfigError(
            f"--config-file {path}: no such file. Configs live under configs/, e.g. configs/grefcoco/instalign_swin_base.yaml"
        )


def _check_datasets(key: str, names: Iterable[str]) -> None:
    known = DatasetCatalog.list()
    for name in names:
        if name not in known:
            close = sorted(k for k in known if k.split("_")[0] == name.split("_")[0]) or sorted(
                known
            )
            raise ConfigError(
                f"{key}: unknown dataset {name!r}. Registered names include: {', '.join(close[:12])}"
            )


def _is_remote(path: str) -> bool:
    return "://" in path


def check_config(cfg, *, eval_only: bool = False, resume: bool = False) -> None:
    """Raise :class:`ConfigError` for the first config value that cannot work."""
    if not eval_only:
        _check_datasets("DATASETS.TRAIN", cfg.DATASETS.TRAIN)
    _check_datasets("DATASETS.TEST", cfg.DATASETS.TEST)

    weights = cfg.MODEL.WEIGHTS
    if weights:
        if _is_remote(weights):
            raise ConfigError(
                f"MODEL.WEIGHTS={weights}: remote weights cannot be fetched here (no model hub); "
                "download the file elsewhere and give its local path."
            )
        if not os.path.isfile(expand_path(weights)):
            raise ConfigError(
                f"MODEL.WEIGHTS={weights}: no such file. Give the path of a checkpoint (.pth), e.g. output/model_final.pth"
            )
    elif eval_only and not resume:
        raise ConfigError(
            "--eval-only needs a checkpoint: add MODEL.WEIGHTS path/to/model_final.pth after the options"
        )

    timm = getattr(cfg.MODEL, "TIMM", None)
    pretrain_iterations = timm.SYNTHETIC_PRETRAIN.ITERATIONS if timm is not None else 0
    if pretrain_iterations > 0 and not eval_only:
        if not timm.PRETRAINED_WEIGHTS:
            raise ConfigError(
                "MODEL.TIMM.SYNTHETIC_PRETRAIN.ITERATIONS > 0 writes its backbone to MODEL.TIMM.PRETRAINED_WEIGHTS, "
                "which is empty: give a path, e.g. $DETECTRON2_DATASETS/synthetic_gres/backbone.pth"
            )
        if not any(name.startswith("synthetic_gres") for name in cfg.DATASETS.TRAIN):
            raise ConfigError(
                "MODEL.TIMM.SYNTHETIC_PRETRAIN.ITERATIONS > 0 pre-trains on the synthetic dataset, which is not "
                f"in DATASETS.TRAIN {tuple(cfg.DATASETS.TRAIN)}; set it to 0 and give pre-trained weights instead."
            )
    if cfg.MODEL.BACKBONE.NAME == "TimmBackbone" and timm is not None and timm.PRETRAINED_WEIGHTS:
        # A file that synthetic pre-training will make need not exist yet.
        if not os.path.isfile(expand_path(timm.PRETRAINED_WEIGHTS)) and not (
            pretrain_iterations > 0 and not eval_only
        ):
            raise ConfigError(
                f"MODEL.TIMM.PRETRAINED_WEIGHTS={timm.PRETRAINED_WEIGHTS}: no such file. Give a local timm "
                f"checkpoint of {timm.NAME} (.pth or .safetensors), or '' to start from random weights."
            )

    text = getattr(cfg.MODEL, "TEXT_ENCODER", None)
    if text is not None and not _text_encoder_will_be_generated(cfg):
        try:
            resolve_text_encoder(text.NAME)
        except TextEncoderNotFoundError as exc:
            raise ConfigError(str(exc)) from None

    if not eval_only:
        ImageSizeSchedule.from_config(cfg)

    if cfg.SOLVER.AMP.ENABLED and not cfg.MODEL.DEVICE.startswith("cuda"):
        raise ConfigError(
            "SOLVER.AMP.ENABLED=True needs a CUDA GPU (Detectron2's AMPTrainer); "
            "add SOLVER.AMP.ENABLED False to train on the CPU."
        )


def check_datasets(cfg, *, eval_only: bool = False) -> None:
    """Load and check the splits the run uses: DATASETS.TRAIN when training, DATASETS.TEST always.

    Raises :class:`~instalign_d2.data.datasets.errors.DatasetError` (one line: the key, the
    dataset, the file, the problem, the fix) for a malformed file or folder, too many missing
    images or a split with no usable expression. The loaded dicts wait for the data loaders
    built next in this process (``instalign_d2/data/checked.py``); call its ``release()`` when
    those run elsewhere or not at all.
    """
    keys = ([] if eval_only else [("DATASETS.TRAIN", cfg.DATASETS.TRAIN)]) + [
        ("DATASETS.TEST", cfg.DATASETS.TEST)
    ]
    for key, names in keys:
        for name in names:
            try:
                checked.preload(cfg, [name])
            except DatasetLayoutError as exc:
                checked.release()
                raise checked.with_key(key, name, exc) from None


def _text_encoder_will_be_generated(cfg) -> bool:
    """The synthetic dataset writes its own tiny text encoder; it may not exist before the first run."""
    synthetic_dir = os.path.join(datasets_root(), "synthetic_gres")
    name = expand_path(cfg.MODEL.TEXT_ENCODER.NAME)
    uses_synthetic = any(
        n.startswith("synthetic_gres") for n in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    )
    return uses_synthetic and os.path.abspath(name).startswith(os.path.abspath(synthetic_dir))
