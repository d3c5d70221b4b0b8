"""The GRES mapper: one dataset dict (one expression) -> the model's input (docs/interfaces.md §2).

Reads the image (3-channel uint8, EXIF applied), resizes it to S x S (``INPUT.IMAGE_SIZE``,
bilinear) and the instance masks with it (nearest, through :mod:`instalign_d2.data.masks`, so
they equal pycocotools' decode bit for bit), and tokenises the expression with the text
encoder's own tokenizer (its pad id, e.g. RoBERTa's 1, and its attention mask).

A sample whose image is missing or unreadable is logged with its ref id. The train mapper
returns None (the train loader's ``UnreadableImageGuard`` counts it and Detectron2's
``MapDataset`` draws another sample); the test mapper returns the sample with
``skipped_reason`` and an all-zero image, so the evaluator can count it. A sample the loader
marked ``image_missing`` is skipped without looking for the file again.
"""

from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import transforms as T
from detectron2.structures import Instances
from PIL import Image

from instalign_d2.data.augmentation import CROP_TRIES, MIN_TARGET_KEPT, build_gres_augmentations
from instalign_d2.data.byte_budget_lru import ByteBudgetLRU
from instalign_d2.data.image_io import read_image_uint8
from instalign_d2.data.masks import instance_masks, transform_masks
from instalign_d2.utils.tokenizer import load_tokenizer, tokenize

logger = logging.getLogger(__name__)

__all__ = ["GRESDatasetMapper"]

# Dataset-dict fields copied to the output unchanged (when present).
PASSTHROUGH_KEYS = (
    "file_name",
    "height",
    "width",
    "image_id",
    "sentence",
    "empty",
    "expression_kind",
    "source",
    "refzom_kind",
    "expression_template",
)
EVAL_RESOLUTIONS = ("input", "original")


class GRESDatasetMapper:
    """Map a GRES dataset dict to ``image``, ``instances``, ``gt_mask_merged``, tokens, ...

    Build it from a config (``GRESDatasetMapper(cfg, is_train)``) or from plain arguments.
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        image_size: int,
        text_encoder_name: str,
        max_tokens: int,
        image_format: str = "RGB",
        augmentations: Sequence[T.Augmentation] = (),
        eval_resolution: str = "input",
        cache_mb: float = 0,
        category_maps: bool = False,
    ):
        """
        Args:
            is_train: train mapper (bad samples -> None, augmentation) or test mapper.
            image_size: S, the side of the square model input.
            text_encoder_name: MODEL.TEXT_ENCODER.NAME (a local transformers directory).
            max_tokens: MODEL.TEXT_ENCODER.MAX_TOKENS.
            image_format: INPUT.FORMAT, "RGB" or "BGR".
            augmentations: train-time augmentations applied before the resize.
            eval_resolution: TEST.EVAL_RESOLUTION; "original" adds ``gt_mask_merged_original``
                to the test mapper's output.
            cache_mb: INPUT.CACHE_MB, megabytes of resized images kept for the next epochs
                (least recently used out first); 0 keeps the last one only.
            category_maps: add ``category_map`` (uint8 S x S: the ``category_id`` of the object
                at each pixel, 0 elsewhere) made from the dataset dict's ``image_annotations``
                (all objects of the image), for MODEL.INSTALIGN.DENSE_CATEGORY_WEIGHT.
        """
        if eval_resolution not in EVAL_RESOLUTIONS:
            raise ValueError(
                f"TEST.EVAL_RESOLUTION={eval_resolution!r}: expected one of {EVAL_RESOLUTIONS}"
            )
        if int(image_size) <= 0:
            raise ValueError(f"INPUT.IMAGE_SIZE={image_size}: expected a positive size")
        if not cache_mb >= 0:
            raise ValueError(f"INPUT.CACHE_MB={cache_mb}: expected 0 (off) or a positive size")
        self.is_train = bool(is_train)
        self.image_size = int(image_size)
        self.text_encoder_name = text_encoder_name
        self.max_tokens = int(max_tokens)
        self.image_format = image_format
        self.augmentations = list(augmentations) if self.is_train else []
        self.eval_resolution = eval_resolution
        self.category_maps = bool(category_maps)
        self.num_skipped = 0  # samples of this worker whose image could not be read
        self.last_skip_reason = ""  # why the last skipped sample was skipped (one line)
        # The last image read: evaluation (and training with TRAIN_EXPRESSIONS_PER_IMAGE) maps the
        # expressions of one image one after the other (data/build.py), so each image is decoded
        # once, not once per expression. Nothing modifies it in place (transforms make copies).
        self._last_image: Tuple[Optional[str], Optional[np.ndarray]] = (None, None)
        # Without augmentation the model input of an image is the same for each of its expressions:
        # they share one tensor, so the model need not compare pixels to see one image. Kept for
        # the next epochs up to ``cache_mb`` (at least the last one). Keyed by file name and size:
        # a schedule may change ``image_size`` between two samples.
        cache_bytes = int(cache_mb * 2**20)
        self._inputs = ByteBudgetLRU(cache_bytes, keep_at_least=1)
        # With a budget, also what each expression adds (its annotations' resized masks, by
        # annotation id, and its token ids): after the first epoch a sample costs no decoding,
        # resizing or tokenising. Nothing modifies the kept values in place.
        self._parts = ByteBudgetLRU(cache_bytes)
        mode = "train" if self.is_train else "test"
        logger.info(
            f"[GRESDatasetMapper] {mode}: {self.image_size}x{self.image_size}, augmentations {self.augmentations}"
        )

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        augment = cfg.INPUT.AUGMENT
        return {
            "is_train": is_train,
            "image_size": cfg.INPUT.IMAGE_SIZE,
            "image_format": cfg.INPUT.FORMAT,
            "text_encoder_name": cfg.MODEL.TEXT_ENCODER.NAME,
            "max_tokens": cfg.MODEL.TEXT_ENCODER.MAX_TOKENS,
            "augmentations": build_gres_augmentations(
                enabled=bool(augment.ENABLED) and is_train,
                scale_range=tuple(augment.SCALE_RANGE),
                brightness=augment.BRIGHTNESS,
                contrast=augment.CONTRAST,
                saturation=augment.SATURATION,
            ),
            "eval_resolution": cfg.TEST.EVAL_RESOLUTION,
            "cache_mb": cfg.INPUT.CACHE_MB,
            "category_maps": is_train and cfg.MODEL.INSTALIGN.DENSE_CATEGORY_WEIGHT > 0,
        }

    @property
    def tokenizer(self):
        # Loaded on first use (cached per name), so the mapper stays cheap to build and to pickle.
        return load_tokenizer(self.text_encoder_name)

    # ------------------------------------------------------------------------- steps
    def _read_image(self, dataset_dict: dict) -> Tuple[Optional[np.ndarray], str]:
        """The image, or None and a one-line reason."""
        file_name = dataset_dict["file_name"]
        if self._last_image[0] == file_name:
            return self._last_image[1], ""
        if dataset_dict.get("image_missing"):  # the loader found it absent: no need to look again
            return None, f"image not found: {file_name}"
        try:
            image = read_image_uint8(file_name, self.image_format)
        except FileNotFoundError:
            return None, f"image not found: {file_name}"
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            return None, f"unreadable image {file_name}: {type(e).__name__}: {e}"
        expected = (dataset_dict["height"], dataset_dict["width"])
        if image.shape[:2] != expected:
            return None, (
                f"image {file_name} is {image.shape[1]}x{image.shape[0]} but its annotation says "
                f"{expected[1]}x{expected[0]} (wrong file or EXIF rotation)"
            )
        self._last_image = (file_name, image)
        return image, ""

    def _keep_input(self, key: Tuple[str, int], image_tensor: torch.Tensor) -> None:
        """Keep a model input; drop the least recently used ones beyond the budget."""
        self._inputs.put(key, image_tensor, image_tensor.numel() * image_tensor.element_size())

    def _mask_keys(self, dataset_dict: dict, annotations: Sequence[dict]) -> Optional[List[tuple]]:
        """Keys of the annotations' masks at the input size, or None when they are not kept (no
        budget, or an annotation without an id)."""
        if not self._parts.budget_bytes or any("id" not in a for a in annotations):
            return None
        # The box too: two datasets on one image (gRefCOCO and Ref-ZOM on COCO's) may number
        # their annotations differently.
        return [
            ("mask", dataset_dict["file_name"], self.image_size, a["id"], tuple(a.get("bbox", ())))
            for a in annotations
        ]

    def _kept_masks(self, keys: Optional[List[tuple]]) -> Optional[np.ndarray]:
        """``bool (M, S, S)`` from the kept masks, or None unless every one is kept."""
        if keys is None:
            return None
        if not keys:  # a no-target expression
            return np.zeros((0, self.image_size, self.image_size), dtype=bool)
        kept = [self._parts.get(key) for key in keys]
        return None if any(m is None for m in kept) else np.stack(kept)

    def _tokens(self, raw: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask of one expression (kept by text when there is a budget)."""
        key = ("tokens", raw)
        kept = self._parts.get(key)
        if kept is None:
            tokens = tokenize(self.tokenizer, [raw], self.max_tokens)
            kept = (tokens["input_ids"][0], tokens["attention_mask"][0])
            if self._parts.budget_bytes:
                self._parts.put(key, kept, sum(t.numel() * t.element_size() for t in kept))
        return kept

    def _category_map(
        self, dataset_dict: dict, transforms: T.Transform, cacheable: bool
    ) -> Optional[torch.Tensor]:
        """``uint8 (S, S)``: the category of the object at each pixel of the model input (0 where
        there is none; a later object over an earlier one), or None without ``image_annotations``.
        """
        objects = dataset_dict.get("image_annotations")
        if objects is None:
            return None
        key = ("category_map", dataset_dict["file_name"], self.image_size)
        kept = self._parts.get(key) if cacheable else None
        if kept is not None:
            return kept
        largest = max((int(o["category_id"]) for o in objects), default=0)
        if largest > 254:  # 255 is the padding the model ignores
            raise ValueError(
                f"{dataset_dict['file_name']}: category_id {largest} does not fit a uint8 category "
                "map (at most 254); the dense category loss needs fewer categories"
            )
        height, width = dataset_dict["height"], dataset_dict["width"]
        masks = transform_masks(instance_masks(objects, height, width), transforms)
        category_map = np.zeros((self.image_size, self.image_size), dtype=np.uint8)
        for mask, obj in zip(masks, objects):
            category_map[mask] = int(obj["category_id"])
        category_map = torch.from_numpy(category_map)
        if cacheable and self._parts.budget_bytes:
            self._parts.put(key, category_map, category_map.numel())
        return category_map

    def _augment(self, image: np.ndarray, masks: np.ndarray) -> T.Transform:
        """Train-time transforms at the original size; a crop must keep most of every target."""
        if not self.augmentations:
            return T.TransformList([])
        areas = masks.reshape(len(masks), -1).sum(1)
        for _ in range(CROP_TRIES):
            transforms = T.AugmentationList(self.augmentations)(T.AugInput(image))
            kept = transform_masks(masks, transforms).reshape(len(masks), -1).sum(1)
            if np.all(kept >= MIN_TARGET_KEPT * areas):
                return transforms
        # No crop kept the targets: keep only the photometric part.
        photometric = [a for a in self.augmentations if not isinstance(a, T.RandomCrop)]
        return T.AugmentationList(photometric)(T.AugInput(image))

    def _skip(self, dataset_dict: dict, reason: str) -> None:
        self.num_skipped += 1
        self.last_skip_reason = reason
        sentence = dataset_dict.get("sentence", {})
        logger.warning(
            "skipping ref %s (sentence %s): %s [%d skipped by this %s mapper]",
            sentence.get("ref_id"),
            sentence.get("sent_id"),
            reason,
            self.num_skipped,
            "train" if self.is_train else "test",
        )

    # ------------------------------------------------------------------------- call
    def __call__(self, dataset_dict: dict) -> Optional[dict]:
        """The model input of one expression (the input dict is not modified)."""
        height, width = dataset_dict["height"], dataset_dict["width"]
        annotations = dataset_dict.get("annotations") or []
        size = self.image_size
        input_key = (dataset_dict["file_name"], size)
        # An input kept from before was read without error and without augmentation.
        image_tensor = None if self.augmentations else self._inputs.get(input_key)
        reason = ""
        if image_tensor is None:
            image, reason = self._read_image(dataset_dict)
            if image is None:
                self._skip(dataset_dict, reason)
                if self.is_train:
                    return None
                image = np.zeros((height, width, 3), dtype=np.uint8)
        masks = None  # bool (M, H, W) at the image's size, decoded when needed
        if image_tensor is None:
            masks = instance_masks(annotations, height, width)
            transforms = self._augment(image, masks) if self.is_train else T.TransformList([])
            image = transforms.apply_image(image)
            resize = T.ResizeTransform(
                image.shape[0], image.shape[1], size, size, interp=Image.BILINEAR
            )
            image_tensor = torch.as_tensor(
                np.ascontiguousarray(resize.apply_image(image).transpose(2, 0, 1))
            )
            if not transforms.transforms and not reason:
                self._keep_input(input_key, image_tensor)
        else:  # _read_image checked that the file is height x width
            transforms = T.TransformList([])
            resize = T.ResizeTransform(height, width, size, size, interp=Image.BILINEAR)
        # Resized masks are kept only when the resize is the whole transform.
        resize_only = not transforms.transforms and not reason
        mask_keys = self._mask_keys(dataset_dict, annotations) if resize_only else None
        transforms = transforms + resize
        gt_masks = self._kept_masks(mask_keys)  # bool (M, S, S), nearest
        if gt_masks is None:
            if masks is None:
                masks = instance_masks(annotations, height, width)
            gt_masks = transform_masks(masks, transforms)
            for key, mask in zip(mask_keys or (), gt_masks):
                self._parts.put(key, mask.copy(), mask.nbytes)  # its own memory, not a view

        record = {key: dataset_dict[key] for key in PASSTHROUGH_KEYS if key in dataset_dict}
        record["empty"] = bool(dataset_dict.get("empty", not annotations))
        record["image"] = image_tensor
        instances = Instances((size, size))
        instances.gt_masks = torch.from_numpy(np.ascontiguousarray(gt_masks))
        instances.gt_classes = torch.tensor(
            [a["category_id"] for a in annotations], dtype=torch.int64
        )
        record["instances"] = instances
        record["gt_mask_merged"] = (
            torch.from_numpy(gt_masks.any(axis=0))
            if len(gt_masks)
            else torch.zeros((size, size), dtype=torch.bool)
        )
        if not self.is_train and self.eval_resolution == "original":
            if masks is None:
                masks = instance_masks(annotations, height, width)
            record["gt_mask_merged_original"] = (
                torch.from_numpy(masks.any(axis=0))
                if len(masks)
                else torch.zeros((height, width), dtype=torch.bool)
            )
        if self.category_maps:
            category_map = self._category_map(dataset_dict, transforms, cacheable=resize_only)
            if category_map is not None:
                record["category_map"] = category_map
        record["input_ids"], record["attention_mask"] = self._tokens(
            dataset_dict["sentence"]["raw"]
        )
        if reason:  # test mapper only (the train mapper returned None); the image is all zeros
            record["skipped_reason"] = reason
        return record
