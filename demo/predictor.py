"""Python API of InstAlign: ``GRESPredictor(cfg)(image_bgr, ["expr 1", "expr 2", ...])``.

The image is encoded once (backbone + pixel decoder) for all its expressions, and the encoding of
the last few images is kept, keyed by their content: asking about the same image again runs only
the expression path. Each expression gets its merged mask, no-target probability and instances
with the words they align with. ``demo/demo.py`` (files) and ``demo/app.py`` (browser page) share
the config loading, the pictures and the JSON records defined here.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from PIL import Image

from instalign_d2 import add_instalign_config
from instalign_d2.engine import AtomicCheckpointer, ConfigError, check_config_file
from instalign_d2.utils.tokenizer import ThreadSafeTokenizer, tokenize
from instalign_d2.utils.visualizer import align_words, aligned_words, draw_answer

logger = logging.getLogger(__name__)

MIN_IMAGE_SIDE = 32  # below this the stride-32 backbone sees less than one feature cell
MAX_IMAGE_SIDE = 4000  # above this the full-size output masks alone take gigabytes


class BadInputError(ValueError):
    """An image or expression the predictor cannot answer; the message says what and how to fix."""


def build_config(config_file: str, opts: Sequence[str] = ()):
    """The frozen config of ``--config-file`` and ``KEY VALUE`` overrides, for inference.

    Raises :class:`ConfigError` (one line: the key, the value and the fix) for a missing config
    file, a bad override or a ``MODEL.WEIGHTS`` that is not a file.
    """
    check_config_file(config_file)
    cfg = get_cfg()
    add_instalign_config(cfg)
    try:
        cfg.merge_from_file(config_file)
    except (KeyError, ValueError, AssertionError) as exc:
        raise ConfigError(f"--config-file {config_file}: {exc}") from None
    opts = list(opts)
    if len(opts) % 2:
        raise ConfigError(f"--opts must be KEY VALUE pairs, got an odd list: {' '.join(opts)}")
    try:
        cfg.merge_from_list(opts)
    except (KeyError, ValueError, AssertionError) as exc:
        raise ConfigError(
            f"--opts: {exc} (keys are listed in instalign_d2/config.py and detectron2's defaults)"
        ) from None
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"  # Detectron2 defaults to CUDA; a laptop has none
    if cfg.MODEL.WEIGHTS and not os.path.isfile(cfg.MODEL.WEIGHTS):
        raise ConfigError(
            f"MODEL.WEIGHTS={cfg.MODEL.WEIGHTS}: no such file; give a trained checkpoint (.pth)"
        )
    cfg.freeze()
    return cfg


def mask_rle(mask: np.ndarray) -> Dict:
    """COCO RLE of a (H, W) mask, with ``counts`` as text so that it goes into JSON."""
    rle = mask_util.encode(np.asfortranarray(np.asarray(mask).astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def answer_record(output: Dict) -> Dict:
    """What the JSON files of the demo hold for one expression (see :func:`image_record`)."""
    instances = output["instances"]
    return {
        "expression": output["expression"],
        "nt_prob": float(output["nt_prob"]),
        "no_target": output["no_target"],
        "mask_rle": mask_rle(output["mask"].cpu().numpy()),
        "mask_area": int(output["mask"].sum()),
        "instances": [
            {
                "score": float(instances.scores[k]),
                "mask_rle": mask_rle(instances.pred_masks[k].cpu().numpy()),
                "words": output["instance_words"][k],
            }
            for k in range(len(instances))
        ],
    }


def image_record(image_name: str, image: np.ndarray, outputs: Sequence[Dict]) -> Dict:
    """The JSON of one image and its answers: image name, height, width, one record per expression
    (expression, ``nt_prob``, ``no_target``, merged mask as COCO RLE and its area, instances with
    score, mask RLE and aligned words)."""
    return {
        "image": image_name,
        "height": int(image.shape[0]),
        "width": int(image.shape[1]),
        "answers": [answer_record(output) for output in outputs],
    }


class GRESPredictor:
    """Load a trained InstAlign from ``cfg`` (``MODEL.WEIGHTS``) and answer expressions about images.

    ``predictor(image, expressions)`` with ``image`` an ``(H, W, 3)`` uint8 array in BGR order (as
    Detectron2's ``DefaultPredictor`` and OpenCV use; ``(H, W)`` greyscale is accepted) returns one
    dict per expression: ``ref_seg`` (H, W) merged-mask probability, ``mask`` (H, W) bool (empty
    when no target is predicted), ``nt_prob``, ``no_target``, ``instances`` (``pred_masks``,
    ``scores``, ``token_weights``) and ``instance_words``: for each instance, the words of the
    expression it aligns with most (the POA relevance of Eq. 1).

    The visual features of the last ``cache_size`` images are kept, keyed by :meth:`image_key`;
    calls may come from several threads (they take turns on the model).
    """

    def __init__(self, cfg, cache_size: int = 4):
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
        # Requests of the demo page tokenise from several threads; the model and the predictor
        # share one tokenizer whose calls take turns.
        self.tokenizer = ThreadSafeTokenizer(self.model.text_encoder.tokenizer)
        self.model.text_encoder.tokenizer = self.tokenizer
        self.cache_size = cache_size
        self._features: "OrderedDict[str, object]" = OrderedDict()
        # One model call at a time: torch already spreads one call over the cores, and the
        # feature cache must not be read while another call fills it.
        self._lock = threading.Lock()

    def check_image(self, image: np.ndarray) -> np.ndarray:
        """``(H, W, 3)`` uint8 BGR, or :class:`BadInputError`."""
        if not isinstance(image, np.ndarray):
            raise BadInputError(
                f"image must be a numpy array (H, W, 3), got {type(image).__name__}"
            )
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] != 3:
            raise BadInputError(
                f"image must be (H, W, 3) BGR or (H, W) greyscale, got shape {image.shape}"
            )
        if image.dtype != np.uint8:
            raise BadInputError(
                f"image must be uint8, got {image.dtype}; read files with instalign_d2.data.image_io.read_image_uint8"
            )
        check_image_size(image.shape[0], image.shape[1])
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
                raise BadInputError(
                    f"expression {i + 1} is empty: give a referring expression such as 'the dog on the left'"
                )
        return [text.strip() for text in expressions]

    def token_count(self, text: str) -> int:
        """Tokens of ``text`` as the model counts them against MAX_TOKENS (with <s> and </s>)."""
        return len(self.tokenizer(text)["input_ids"])

    @staticmethod
    def image_key(image_bgr: np.ndarray) -> str:
        """A digest of the image's pixels and shape: equal images, equal keys."""
        digest = hashlib.blake2b(np.ascontiguousarray(image_bgr).data, digest_size=16)
        digest.update(repr((image_bgr.shape, image_bgr.dtype.str)).encode())
        return digest.hexdigest()

    def _model_inputs(self, image_bgr: np.ndarray, expressions: List[str]) -> List[Dict]:
        height, width = image_bgr.shape[:2]
        image = image_bgr[:, :, ::-1] if self.input_format == "RGB" else image_bgr
        # Same resize as the GRES mapper, so the model sees what it was trained on.
        resized = T.ResizeTransform(
            height, width, self.image_size, self.image_size, interp=Image.BILINEAR
        ).apply_image(np.ascontiguousarray(image))
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

    def _visual_features(self, key: str, model_input: Dict):
        """The image's backbone + pixel decoder output, from the cache when it was seen lately."""
        features = self._features.get(key)
        if features is not None:
            self._features.move_to_end(key)
            return features
        features = self.model.encode_images([model_input])
        if self.cache_size > 0:
            self._features[key] = features
            while len(self._features) > self.cache_size:
                self._features.popitem(last=False)
        return features

    @torch.no_grad()
    def __call__(self, image_bgr: np.ndarray, expressions: Union[str, Sequence[str]]) -> List[Dict]:
        image_bgr = self.check_image(image_bgr)
        expressions = self.check_expressions(expressions)
        inputs = self._model_inputs(image_bgr, expressions)
        key = self.image_key(image_bgr)
        with self._lock:
            # InstAlign.inference, with the image's visual pass taken from the cache when it can.
            visual_features = self._visual_features(key, inputs[0])
            image_index = torch.zeros(len(inputs), dtype=torch.long)
            input_ids, attention_mask = self.model.text_inputs(inputs)
            raw = self.model.decode_expressions(
                visual_features, image_index, input_ids, attention_mask
            )
            outputs = self.model.postprocess(raw, visual_features, image_index, inputs)
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
        words = align_words(
            self.tokenizer, text, instances.token_weights.cpu().numpy(), self.max_tokens
        )
        return [[words[i].word for i in indices] for indices in aligned_words(words)]

    def draw(
        self,
        image_rgb: np.ndarray,
        output: Dict,
        max_instances: int = 3,
        max_panel_side: Optional[int] = None,
    ) -> Image.Image:
        """The picture of one answer (the paper's Fig. 6), see :func:`draw_answer`."""
        return draw_answer(
            image_rgb,
            output["expression"],
            output,
            self.tokenizer,
            self.max_tokens,
            max_instances=max_instances,
            nt_threshold=self.cfg.MODEL.INSTALIGN.TEST.NO_TARGET_THRESHOLD,
            mask_threshold=self.cfg.MODEL.INSTALIGN.TEST.MASK_THRESHOLD,
            max_panel_side=max_panel_side,
        )


def check_image_size(height: int, width: int) -> Tuple[int, int]:
    """``(height, width)``, or :class:`BadInputError` when a side is under MIN_IMAGE_SIDE or over
    MAX_IMAGE_SIDE (callers may check a file's header with it before decoding the pixels)."""
    if min(height, width) < MIN_IMAGE_SIDE:
        raise BadInputError(
            f"image is {width}x{height} px; InstAlign needs at least {MIN_IMAGE_SIDE} px per side (upscale it first)"
        )
    if max(height, width) > MAX_IMAGE_SIDE:
        raise BadInputError(
            f"image is {width}x{height} px; the largest side may be {MAX_IMAGE_SIDE} px (downscale it first)"
        )
    return height, width
