"""Python API of InstAlign: ``GRESPredictor(cfg)(image_bgr, ["expr 1", "expr 2", ...])``.

The image is encoded once (backbone + pixel decoder) for all its expressions; each expression
gets its merged mask, no-target probability and instances with the words they align with.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Sequence, Union

import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from PIL import Image

from instalign_d2.engine import AtomicCheckpointer
from instalign_d2.modeling.language.tokenizer import tokenize
from instalign_d2.utils.visualizer import align_words, aligned_words

logger = logging.getLogger(__name__)

MIN_IMAGE_SIDE = 32  # below this the stride-32 backbone sees less than one feature cell
MAX_IMAGE_SIDE = 4000  # above this the full-size output masks alone take gigabytes


class BadInputError(ValueError):
    """An image or expression the predictor cannot answer; the message says what and how to fix."""


class GRESPredictor:
    """Load a trained InstAlign from ``cfg`` (``MODEL.WEIGHTS``) and answer expressions about images.

    ``predictor(image, expressions)`` with ``image`` an ``(H, W, 3)`` uint8 array in BGR order (as
    Detectron2's ``DefaultPredictor`` and OpenCV use; ``(H, W)`` greyscale is accepted) returns one
    dict per expression: ``ref_seg`` (H, W) merged-mask probability, ``mask`` (H, W) bool (empty
    when no target is predicted), ``nt_prob``, ``no_target``, ``instances`` (``pred_masks``,
    ``scores``, ``token_weights``) and ``instance_words``: for each instance, the words of the
    expression it aligns with most (the POA relevance of Eq. 1).
    """

    def __init__(self, cfg):
        self.cfg = cfg.clone()
        if cfg.MODEL.WEIGHTS:
            # The checkpoint replaces every weight: the backbone's initial weights need not exist here.
            self.cfg.defrost()
            self.cfg.MODEL.TIMM.PRETRAINED_WEIGHTS = ""
            self.cfg.freeze()
        self.model = build_model(self.cfg).eval()
        if cfg.MODEL.WEIGHTS:
            AtomicCheckpointer(self.model).load(cfg.MODEL.WEIGHTS)
        else:
            logger.warning("GRESPredictor: MODEL.WEIGHTS is empty, the model has random weights.")
        self.image_size = cfg.INPUT.IMAGE_SIZE
        self.input_format = cfg.INPUT.FORMAT
        self.max_tokens = cfg.MODEL.TEXT_ENCODER.MAX_TOKENS
        self.tokenizer = self.model.text_encoder.tokenizer

    def check_image(self, image: np.ndarray) -> np.ndarray:
        """``(H, W, 3)`` uint8 BGR, or :class:`BadInputError`."""
        if not isinstance(image, np.ndarray):
            raise BadInputError(f"image must be a numpy array (H, W, 3), got {type(image).__name__}")
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] != 3:
            raise BadInputError(f"image must be (H, W, 3) BGR or (H, W) greyscale, got shape {image.shape}")
        if image.dtype != np.uint8:
            raise BadInputError(f"image must be uint8, got {image.dtype}; read files with instalign_d2.data.image_io.read_image_uint8")
        height, width = image.shape[:2]
        if min(height, width) < MIN_IMAGE_SIDE:
            raise BadInputError(f"image is {width}x{height} px; InstAlign needs at least {MIN_IMAGE_SIDE} px per side (upscale it first)")
        if max(height, width) > MAX_IMAGE_SIDE:
            raise BadInputError(f"image is {width}x{height} px; the largest side may be {MAX_IMAGE_SIDE} px (downscale it first)")
        return image

    @staticmethod
    def check_expressions(expressions: Union[str, Sequence[str]]) -> List[str]:
        if isinstance(expressions, str):
            expressions = [expressions]
        expressions = list(expressions)
        if not expressions:
            raise BadInputError("no expression given: pass at least one referring expression")
        for i, text in enumerate(expressions):
            if not isinstance(text, str) or not text.strip():
                raise BadInputError(f"expression {i + 1} is empty: give a referring expression such as 'the dog on the left'")
        return [text.strip() for text in expressions]

    def _model_inputs(self, image_bgr: np.ndarray, expressions: List[str]) -> List[Dict]:
        height, width = image_bgr.shape[:2]
        image = image_bgr[:, :, ::-1] if self.input_format == "RGB" else image_bgr
        # Same resize as the GRES mapper, so the model sees what it was trained on.
        resized = T.ResizeTransform(height, width, self.image_size, self.image_size, interp=Image.BILINEAR).apply_image(
            np.ascontiguousarray(image)
        )
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        tokens = tokenize(self.tokenizer, expressions, self.max_tokens)  # warns when truncating
        # One image tensor for all expressions: the model groups them and encodes the image once.
        return [
            {
                "image": tensor,
                "height": height,
                "width": width,
                "file_name": "<GRESPredictor>",
                "input_ids": tokens["input_ids"][i],
                "attention_mask": tokens["attention_mask"][i],
                "sentence": {"raw": text},
            }
            for i, text in enumerate(expressions)
        ]

    @torch.no_grad()
    def __call__(self, image_bgr: np.ndarray, expressions: Union[str, Sequence[str]]) -> List[Dict]:
        image_bgr = self.check_image(image_bgr)
        expressions = self.check_expressions(expressions)
        outputs = self.model(self._model_inputs(image_bgr, expressions))
        threshold = self.cfg.MODEL.INSTALIGN.TEST.NO_TARGET_THRESHOLD
        for text, output in zip(expressions, outputs):
            output["expression"] = text
            output["no_target"] = bool(output["nt_prob"] > threshold)
            output["mask"] = output["ref_seg"] > self.cfg.MODEL.INSTALIGN.TEST.MASK_THRESHOLD
            output["instance_words"] = self.instance_words(text, output["instances"])
        return outputs

    def instance_words(self, text: str, instances) -> List[List[str]]:
        """For each instance, the words of ``text`` highlighted for it (most aligned first)."""
        if len(instances) == 0:
            return []
        words = align_words(self.tokenizer, text, instances.token_weights.cpu().numpy(), self.max_tokens)
        return [[words[i].word for i in indices] for indices in aligned_words(words)]
