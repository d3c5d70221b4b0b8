"""Backbone pre-training on the synthetic scenes: our stand-in for ImageNet pre-training.

The paper starts from a Swin-B pre-trained on ImageNet-22K. Without a download the tiny config's
backbone starts from random weights, and trained with the GRES losses alone it learns colours at
once but hardly any shapes in 30 CPU minutes (README, "Results": linear probes read shape at
35-50 %, chance 20 %). So, as ImageNet pre-training teaches a backbone what objects look like
before it ever sees an expression, this module teaches the trunk what the synthetic objects look
like: it classifies each object's shape, colour and size from the features of every returned
level averaged over the object's mask (one linear classifier per level and attribute, the sum of
their cross-entropies). Objects and their attributes come from the training split's
``instances.json``; the validation split only measures the result. The classifiers are thrown
away; the trunk is written as a timm checkpoint that ``MODEL.TIMM.PRETRAINED_WEIGHTS`` loads.

``train_net.py`` calls :func:`ensure_synthetic_pretrained_backbone` when
``MODEL.TIMM.SYNTHETIC_PRETRAIN.ITERATIONS > 0``: the file is made when absent, or when the
settings recorded beside it (``<file>.json``) differ from the config's; otherwise it is reused.
Every file made is also kept under ``<file>.by_settings/``, named by a hash of its settings, so
that going back to settings made before (runs of several seeds take turns) is a copy, not
another pre-training.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import pycocotools.mask as mask_util
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.data import detection_utils
from detectron2.data import transforms as T
from iopath.common.file_io import file_lock

from instalign_d2.layers.mask_average import average_over_masks
from instalign_d2.modeling.backbone.timm_backbone import TimmBackbone
from instalign_d2.synthetic.params import IMAGES_DIR, INSTANCES_FILE, read_instances, read_marker
from instalign_d2.synthetic.scene import ATTRIBUTE_VALUES
from instalign_d2.utils.atomic_io import atomic_write_json, atomic_write_path
from instalign_d2.utils.paths import expand_path

logger = logging.getLogger(__name__)

ATTRIBUTES = tuple(ATTRIBUTE_VALUES)  # shape, colour, size


def pool_over_masks(feature_map: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``(C, h, w)`` features averaged over each of ``(n, H, W)`` masks resized to ``(h, w)`` by
    area -> ``(n, C)`` (see :func:`average_over_masks`)."""
    return average_over_masks(feature_map[None], masks[None])[0]


@dataclass
class ObjectAttributeSet:
    """The images of one split at the model's input size, with every object's mask and attributes."""

    images: torch.Tensor  # (N, 3, S, S) uint8, RGB
    masks: List[torch.Tensor]  # per image: (n_i, S, S) float, the mask resized by area
    labels: List[
        torch.Tensor
    ]  # per image: (n_i, len(ATTRIBUTES)) long, indices into ATTRIBUTE_VALUES

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_objects(self) -> int:
        return sum(len(labels) for labels in self.labels)


def load_object_attributes(
    root: str,
    split: str,
    image_size: int,
    max_images: Optional[int] = None,
    instances: Optional[dict] = None,
) -> ObjectAttributeSet:
    """Read a split of a generated synthetic dataset (``root`` holds ``instances.json`` and ``images/``).

    ``instances``: that file already read (:func:`read_instances`), to read it once for several splits.
    """
    if instances is None:
        instances = read_instances(root)
    objects_by_image = collections.defaultdict(list)
    for annotation in instances["annotations"]:
        objects_by_image[annotation["image_id"]].append(annotation)
    records = [image for image in instances["images"] if image["file_name"].startswith(split + "/")]
    records = records[:max_images] if max_images is not None else records
    if not records:
        raise ValueError(
            f"synthetic pre-training: no images of split {split!r} in {os.path.join(root, INSTANCES_FILE)}"
        )

    images, masks, labels = [], [], []
    for record in records:
        image = detection_utils.read_image(
            os.path.join(root, IMAGES_DIR, record["file_name"]), format="RGB"
        )
        # The resize of the GRES mapper, so the backbone sees objects at the scale it will see them.
        resize = T.ResizeTransform(image.shape[0], image.shape[1], image_size, image_size)
        images.append(torch.from_numpy(np.array(resize.apply_image(image))).permute(2, 0, 1))
        objects = objects_by_image[record["id"]]
        full = torch.from_numpy(
            np.stack([mask_util.decode(o["segmentation"]) for o in objects])
        ).float()
        masks.append(F.interpolate(full[:, None], size=(image_size, image_size), mode="area")[:, 0])
        labels.append(
            torch.tensor([[ATTRIBUTE_VALUES[a].index(o[a]) for a in ATTRIBUTES] for o in objects])
        )
    return ObjectAttributeSet(torch.stack(images), masks, labels)


class AttributeClassifiers(nn.Module):
    """One linear classifier per (feature level, attribute) on mask-pooled features."""

    def __init__(self, channels: Mapping[str, int]):
        super().__init__()
        self.levels = list(channels)
        self.heads = nn.ModuleDict(
            {
                level: nn.ModuleDict(
                    {a: nn.Linear(c, len(ATTRIBUTE_VALUES[a])) for a in ATTRIBUTES}
                )
                for level, c in channels.items()
            }
        )

    def forward(
        self, features: Mapping[str, torch.Tensor], masks: Sequence[torch.Tensor]
    ) -> Dict[str, Dict[str, torch.Tensor]]:
        """Logits ``{level: {attribute: (num_objects, num_values)}}`` of every object of the batch."""
        logits = {}
        for level in self.levels:
            pooled = torch.cat(
                [pool_over_masks(features[level][i], m) for i, m in enumerate(masks)]
            )
            logits[level] = {a: self.heads[level][a](pooled) for a in ATTRIBUTES}
        return logits


def attribute_loss(logits, labels: torch.Tensor) -> torch.Tensor:
    """Sum over levels and attributes of the mean cross-entropy over objects."""
    return sum(
        F.cross_entropy(per_attribute[a], labels[:, j])
        for per_attribute in logits.values()
        for j, a in enumerate(ATTRIBUTES)
    )


class _Normalize(nn.Module):
    def __init__(self, pixel_mean: Sequence[float], pixel_std: Sequence[float]):
        super().__init__()
        self.register_buffer(
            "mean", torch.tensor(pixel_mean, dtype=torch.float32).view(1, -1, 1, 1), False
        )
        self.register_buffer(
            "std", torch.tensor(pixel_std, dtype=torch.float32).view(1, -1, 1, 1), False
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) / self.std


@torch.no_grad()
def attribute_accuracy(
    backbone,
    classifiers: AttributeClassifiers,
    normalize,
    data: ObjectAttributeSet,
    batch_size: int = 50,
):
    """``{level: {attribute: accuracy in %}}`` over all objects of ``data`` (backbone in eval mode)."""
    was_training = backbone.training
    backbone.eval()
    correct = collections.Counter()
    for start in range(0, len(data), batch_size):
        chunk = slice(start, start + batch_size)
        logits = classifiers(backbone(normalize(data.images[chunk])), data.masks[chunk])
        labels = torch.cat(data.labels[chunk])
        for level, per_attribute in logits.items():
            for j, a in enumerate(ATTRIBUTES):
                correct[level, a] += int((per_attribute[a].argmax(1) == labels[:, j]).sum())
    backbone.train(was_training)
    return {
        level: {a: 100.0 * correct[level, a] / data.num_objects for a in ATTRIBUTES}
        for level in classifiers.levels
    }


def pretrain_backbone(
    backbone,
    data: ObjectAttributeSet,
    *,
    iterations: int,
    ims_per_batch: int,
    base_lr: float,
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
    weight_decay: float = 0.05,
    seed: int = 0,
    log_period: int = 20,
) -> AttributeClassifiers:
    """Train ``backbone`` (a Detectron2 backbone returning ``{level: map}``) in place.

    AdamW, 10 % linear warm-up then cosine decay: a short run from random
    weights. Images are flipped left-right at random (the shapes' names do not change).
    Returns the fitted classifiers.
    """
    generator = torch.Generator().manual_seed(seed)
    normalize = _Normalize(pixel_mean, pixel_std)
    shapes = backbone.output_shape()
    classifiers = AttributeClassifiers({level: shapes[level].channels for level in sorted(shapes)})
    parameters = [p for p in backbone.parameters() if p.requires_grad] + list(
        classifiers.parameters()
    )
    optimizer = torch.optim.AdamW(parameters, lr=base_lr, weight_decay=weight_decay)
    warmup = max(1, iterations // 10)

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine decay to 0 at the last step
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, iterations - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    backbone.train()
    start = time.perf_counter()
    for iteration in range(1, iterations + 1):
        picked = torch.randint(0, len(data), (ims_per_batch,), generator=generator).tolist()
        images = data.images[picked]
        masks = [data.masks[i] for i in picked]
        if bool(torch.rand((), generator=generator) < 0.5):
            images, masks = images.flip(-1), [m.flip(-1) for m in masks]
        labels = torch.cat([data.labels[i] for i in picked])
        loss = attribute_loss(classifiers(backbone(normalize(images)), masks), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if iteration % log_period == 0 or iteration == iterations:
            elapsed = time.perf_counter() - start
            eta = elapsed / iteration * (iterations - iteration)
            logger.info(
                "backbone pre-training: iter %d/%d  loss %.3f  lr %.2e  eta %d:%02d",
                iteration,
                iterations,
                float(loss.detach()),
                schedule.get_last_lr()[0],
                eta // 60,
                eta % 60,
            )
    return classifiers


def save_timm_trunk(backbone, path: str) -> None:
    """Write the trunk of a :class:`TimmBackbone` as the state dict of the full timm model.

    timm loads pre-trained files into the full model before cutting it to ``features_only``;
    the full model's classifier, which pre-training never used, keeps fresh weights, drawn from a
    fixed seed so that the file's bytes depend on the pre-training alone (not on what else the
    process has drawn from the global generator).
    """

    trunk = backbone.body.state_dict()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        full = timm.create_model(backbone.model_name, pretrained=False, **backbone.timm_kwargs)
    missing, unexpected = full.load_state_dict(trunk, strict=False)
    classifier = full.pretrained_cfg.get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    missing = [k for k in missing if not k.startswith(tuple(c + "." for c in classifier))]
    if missing or unexpected:
        raise RuntimeError(
            f"synthetic pre-training: the features_only trunk of {backbone.model_name!r} does not map onto "
            f"the full timm model (missing {missing[:5]}, unexpected {unexpected[:5]}); "
            "use a CNN whose timm features keep the model's module names (ResNet, RegNet, ConvNeXt)"
        )
    state = full.state_dict()
    atomic_write_path(path, lambda tmp: torch.save(state, tmp))


def pretraining_seed(cfg) -> int:
    """``SYNTHETIC_PRETRAIN.SEED``, or Detectron2's ``SEED`` when that is -1 (0 when both are)."""
    seed = cfg.MODEL.TIMM.SYNTHETIC_PRETRAIN.SEED
    return int(seed if seed >= 0 else max(cfg.SEED, 0))


def pretraining_settings(cfg, dataset_params: Mapping) -> Dict[str, object]:
    """What the pre-trained file depends on; a different value means the file must be made again."""
    timm_cfg = cfg.MODEL.TIMM
    settings = timm_cfg.SYNTHETIC_PRETRAIN
    return {
        "model": timm_cfg.NAME,
        "out_features": list(timm_cfg.OUT_FEATURES),
        "kwargs": {
            k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in timm_cfg.KWARGS.items()
        },
        "drop_path_rate": timm_cfg.DROP_PATH_RATE,
        "image_size": cfg.INPUT.IMAGE_SIZE,
        "pixel_mean": list(cfg.MODEL.PIXEL_MEAN),
        "pixel_std": list(cfg.MODEL.PIXEL_STD),
        "iterations": settings.ITERATIONS,
        "ims_per_batch": settings.IMS_PER_BATCH,
        "base_lr": settings.BASE_LR,
        "seed": pretraining_seed(cfg),
        "dataset": dict(dataset_params),
    }


def settings_path(weights_path: str) -> str:
    return weights_path + ".json"


def stored_path(weights_path: str, settings: Mapping) -> str:
    """Where the weights made with ``settings`` are kept beside ``weights_path``."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    stem = os.path.splitext(os.path.basename(weights_path))[0]
    return os.path.join(weights_path + ".by_settings", f"{stem}-{digest}.pth")


def is_stored(weights_path: str) -> bool:
    """Whether ``weights_path`` is a copy in a store that :func:`stored_path` names."""
    return os.path.basename(os.path.dirname(weights_path)).endswith(".by_settings")


def recorded_settings(weights_path: str) -> Optional[dict]:
    """The settings recorded beside ``weights_path``; None when the weights or the record are missing
    (a run killed between the two writes leaves weights that are not trusted)."""
    if not (os.path.isfile(weights_path) and os.path.isfile(settings_path(weights_path))):
        return None
    with open(settings_path(weights_path)) as f:
        return json.load(f).get("settings")


def forget_settings(weights_path: str) -> None:
    """Remove the settings record before its weights are replaced: a run killed between the
    weights and the new record then leaves weights that are not trusted, never weights that
    an old record vouches for."""
    if os.path.exists(settings_path(weights_path)):
        os.remove(settings_path(weights_path))


def copy_weights(source: str, destination: str) -> None:
    """Copy the weights and then their settings record, each atomically (the record last)."""
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    forget_settings(destination)
    atomic_write_path(destination, lambda tmp: shutil.copyfile(source, tmp))
    atomic_write_path(
        settings_path(destination), lambda tmp: shutil.copyfile(settings_path(source), tmp)
    )


def keep_weights(weights_path: str) -> None:
    """Copy the current weights into the store under their recorded settings, if not there yet."""
    settings = recorded_settings(weights_path)
    if settings is not None and recorded_settings(stored_path(weights_path, settings)) != settings:
        copy_weights(weights_path, stored_path(weights_path, settings))


def ensure_synthetic_pretrained_backbone(cfg, dataset_root: str) -> str:
    """Make ``MODEL.TIMM.PRETRAINED_WEIGHTS`` by pre-training on the synthetic set, unless it is current.

    Safe to call from several processes: a file lock beside the weights lets one train while the
    others wait. The settings file is written after the weights, so a run killed in between makes
    the weights again next time instead of trusting them.

    Returns the path to load: the copy in the store, named by the settings. The file at
    ``PRETRAINED_WEIGHTS`` is rewritten whenever a run with other settings (another seed) comes
    along, which may be between this call and the moment the model loads it; the stored copy never
    changes.
    """
    path = os.path.abspath(expand_path(cfg.MODEL.TIMM.PRETRAINED_WEIGHTS))
    marker = read_marker(dataset_root)
    if marker is None:
        raise FileNotFoundError(f"synthetic pre-training: no generated dataset in {dataset_root}")
    wanted = pretraining_settings(cfg, marker["params"])
    if is_stored(path):  # a run's recorded config names the stored copy that it loaded
        if recorded_settings(path) != wanted:
            raise ValueError(
                f"MODEL.TIMM.PRETRAINED_WEIGHTS={path} is a stored backbone made with other "
                "pre-training settings (seed, iterations, dataset); name the main file beside its "
                f"store ({path.rsplit('.by_settings', 1)[0]}) to make or reuse one for these"
            )
        return path
    settings = cfg.MODEL.TIMM.SYNTHETIC_PRETRAIN
    with file_lock(path):
        current = recorded_settings(path)
        if current == wanted:
            keep_weights(path)
            logger.info("backbone pre-training: %s is up to date", path)
            return stored_path(path, wanted)
        keep_weights(path)  # made before the store existed: keep it before it is replaced
        forget_settings(path)
        stored = stored_path(path, wanted)
        if recorded_settings(stored) == wanted:
            copy_weights(stored, path)
            logger.info(
                "backbone pre-training: %s made with these settings before; copied from %s",
                path,
                stored,
            )
            return stored
        if current is not None:
            logger.info(
                "backbone pre-training: %s was made with other settings (kept in %s); making it for these",
                path,
                os.path.dirname(stored),
            )
        start = time.perf_counter()
        instances = read_instances(dataset_root)
        train_set = load_object_attributes(
            dataset_root, "train", cfg.INPUT.IMAGE_SIZE, instances=instances
        )
        val_set = load_object_attributes(
            dataset_root, "val", cfg.INPUT.IMAGE_SIZE, instances=instances
        )
        logger.info(
            "backbone pre-training: %s from random weights, %d iterations of %d images; "
            "classifying the shape, colour and size of %d objects in %d training images",
            cfg.MODEL.TIMM.NAME,
            settings.ITERATIONS,
            settings.IMS_PER_BATCH,
            train_set.num_objects,
            len(train_set),
        )
        torch.manual_seed(pretraining_seed(cfg))  # the trunk's initial weights
        arguments = TimmBackbone.from_config(cfg)
        arguments.update(pretrained_weights="", freeze=False)
        backbone = TimmBackbone(**arguments)
        classifiers = pretrain_backbone(
            backbone,
            train_set,
            iterations=settings.ITERATIONS,
            ims_per_batch=settings.IMS_PER_BATCH,
            base_lr=settings.BASE_LR,
            pixel_mean=cfg.MODEL.PIXEL_MEAN,
            pixel_std=cfg.MODEL.PIXEL_STD,
            seed=pretraining_seed(cfg),
        )
        accuracy = attribute_accuracy(
            backbone, classifiers, _Normalize(cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD), val_set
        )
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_timm_trunk(backbone, path)
        atomic_write_json(settings_path(path), {"settings": wanted, "val_accuracy": accuracy})
        keep_weights(path)
        logger.info(
            "backbone pre-training: wrote %s in %.0f s; validation accuracy (%d objects) by level: %s",
            path,
            time.perf_counter() - start,
            val_set.num_objects,
            "; ".join(
                f"{level} " + " ".join(f"{a} {v:.0f}%" for a, v in acc.items())
                for level, acc in accuracy.items()
            ),
        )
    return stored
