"""A Detectron2 ``Backbone`` over any timm model that has ``features_only`` (Swin, ResNet, ConvNeXt...).

The paper's visual encoder is Swin-B with ImageNet-22K weights (§4.1). timm builds it (we do not
vendor Swin); this wrapper gives Detectron2 what it expects of a backbone: a dict of NCHW maps
named ``res2..res5`` at strides 4/8/16/32 and their ``output_shape()``.

Three things timm does differently from Mask2Former's Swin, handled here:

* timm's Swin returns NHWC maps; we always return NCHW.
* timm's Swin is built for one input size (``img_size``, 384 for the paper's checkpoint); we build
  it for ``INPUT.IMAGE_SIZE`` and with ``dynamic_img_size`` so any size divisible by 32 runs.
  Stage windows keep their size (12): at 480 the 15x15 stride-32 map is padded to whole windows,
  as Mask2Former's Swin does.
* Mask2Former adds a LayerNorm after each returned Swin stage; ``norm_outputs`` does the same.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from typing import Dict, Iterator, List, Mapping, Optional, Sequence

import timm
import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import nn

from instalign_d2.utils.paths import expand_path

__all__ = ["TimmBackbone", "FEATURE_STRIDES"]

logger = logging.getLogger(__name__)

# How timm 1.0 reports the keys load_state_dict could not match (see _report_weight_loading).
_UNMATCHED_KEYS = re.compile(r"(Missing|Unexpected) keys \((.*)\) (?:discovered|found)", re.DOTALL)

# Detectron2's names of the feature maps, by stride.
FEATURE_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


@contextlib.contextmanager
def _collect_timm_load_messages() -> Iterator[List[logging.LogRecord]]:
    """Collect what timm logs while it loads weights (its missing / unexpected keys).

    timm reports the keys it could not match only through its own logger, missing keys at INFO
    level, which a Detectron2 run does not show; we re-log them where the user sees them.
    """
    timm_logger = logging.getLogger("timm.models._builder")
    records: List[logging.LogRecord] = []

    class _Collector(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = _Collector(level=logging.INFO)
    previous_level = timm_logger.level
    timm_logger.addHandler(handler)
    if timm_logger.getEffectiveLevel() > logging.INFO:
        timm_logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        timm_logger.removeHandler(handler)
        timm_logger.setLevel(previous_level)


def _resolve_weights_path(path: str, model_name: str) -> str:
    resolved = expand_path(path)
    if not os.path.isfile(resolved):
        raise FileNotFoundError(
            f"MODEL.TIMM.PRETRAINED_WEIGHTS={path!r}: no such file ({os.path.abspath(resolved)}). Give the path "
            f"of a local .pth / .safetensors checkpoint of {model_name!r} (timm's or the original release), "
            'or "" for random initialisation.'
        )
    return resolved


def _needs_image_size(model_name: str) -> bool:
    """Whether timm builds ``model_name`` for one input size (Swin, ViT) rather than any (CNNs)."""

    pretrained_cfg = timm.models.get_pretrained_cfg(model_name)
    return bool(pretrained_cfg is not None and getattr(pretrained_cfg, "fixed_input_size", False))


@BACKBONE_REGISTRY.register()
class TimmBackbone(Backbone):
    """timm ``features_only`` model -> ``{"res2": (B, C2, H/4, W/4), ..., "res5": (B, C5, H/32, W/32)}``.

    Args:
        model_name: a timm model name, e.g. ``"swin_base_patch4_window12_384"`` or ``"resnet50"``.
        out_features: which of ``res2..res5`` to return.
        img_size: input side (or (H, W)) the model is built for; only used by models that timm
            builds for one size (Swin, ViT), which then also accept any other size divisible by 32.
        norm_outputs: add a LayerNorm over the channels of each returned map (Mask2Former's Swin).
        pretrained_weights: a local checkpoint of the timm model (timm's keys or the original
            release's; timm's loader converts them); "" for random weights. Never downloads.
        freeze: keep the timm weights fixed (and their BatchNorm / drop-path in eval mode).
        freeze_at: keep only a first part fixed, as detectron2's ``MODEL.BACKBONE.FREEZE_AT``:
            0 nothing, 1 the stem (all that runs before the stride-4 stage), k = 2..5 the stem and
            the stages res2..res{k}.
        drop_path_rate: stochastic depth of the timm model (None: timm's default).
        model_kwargs: more keyword arguments of ``timm.create_model`` (tiny test models, ...).
    """

    @configurable
    def __init__(
        self,
        *,
        model_name: str,
        out_features: Sequence[str] = ("res2", "res3", "res4", "res5"),
        img_size=None,
        norm_outputs: bool = False,
        pretrained_weights: str = "",
        freeze: bool = False,
        freeze_at: int = 0,
        drop_path_rate: Optional[float] = None,
        model_kwargs: Optional[Mapping] = None,
    ):
        super().__init__()

        unknown = [name for name in out_features if name not in FEATURE_STRIDES]
        if not out_features or unknown:
            raise ValueError(
                f"TimmBackbone: out_features must be a non-empty subset of {list(FEATURE_STRIDES)}, "
                f"got {list(out_features)} (MODEL.TIMM.OUT_FEATURES)"
            )
        self.model_name = model_name
        self._out_features = sorted(out_features, key=FEATURE_STRIDES.get)

        kwargs = dict(model_kwargs or {})
        if drop_path_rate is not None:
            kwargs.setdefault("drop_path_rate", drop_path_rate)
        if img_size is not None and _needs_image_size(model_name):
            kwargs.setdefault("img_size", img_size)
            # Build the attention masks for the actual input size, so sizes other than img_size run too.
            kwargs.setdefault("dynamic_img_size", True)
        weights = (
            _resolve_weights_path(pretrained_weights, model_name) if pretrained_weights else ""
        )
        # What builds the same timm model again (synthetic pre-training saves its trunk through it).
        self.timm_kwargs = dict(kwargs)
        if weights:
            # timm's own loader: it reads .pth/.safetensors, unwraps {"model": ...}, and applies the
            # model's checkpoint filter (Swin: original-release key names, window-size resizing).
            kwargs["pretrained_cfg_overlay"] = dict(file=weights)
        try:
            with _collect_timm_load_messages() as load_messages:
                self.body = timm.create_model(
                    model_name, pretrained=bool(weights), features_only=True, **kwargs
                )
        except TypeError as error:
            raise TypeError(
                f"TimmBackbone: timm.create_model({model_name!r}, features_only=True, **{sorted(kwargs)}) failed: "
                f"{error}. Check MODEL.TIMM.KWARGS / DROP_PATH_RATE against that model's arguments."
            ) from error
        if weights:
            self._report_weight_loading(weights, load_messages)

        # Pick, for each requested stride, the deepest timm stage at that stride (ResNet's stage
        # list starts at stride 2, Swin's at 4, so indices alone would not say which is which).
        reductions = self.body.feature_info.reduction()
        channels = self.body.feature_info.channels()
        self._stage_index: Dict[str, int] = {}
        for name in self._out_features:
            matches = [i for i, r in enumerate(reductions) if r == FEATURE_STRIDES[name]]
            if not matches:
                raise ValueError(
                    f"TimmBackbone: {model_name!r} has no feature map at stride {FEATURE_STRIDES[name]} for {name} "
                    f"(its strides: {reductions}); choose another model or other MODEL.TIMM.OUT_FEATURES"
                )
            self._stage_index[name] = matches[-1]
        self._out_feature_strides = {name: FEATURE_STRIDES[name] for name in self._out_features}
        self._out_feature_channels = {
            name: channels[self._stage_index[name]] for name in self._out_features
        }
        self._channels_last = str(getattr(self.body, "output_fmt", "NCHW")).endswith("NHWC")
        self._size_divisibility = max(reductions)

        self.output_norms = nn.ModuleDict(
            {name: nn.LayerNorm(self._out_feature_channels[name]) for name in self._out_features}
            if norm_outputs
            else {}
        )
        # Only the timm trunk: the output norms are new layers with nothing pretrained to keep.
        self._frozen_modules = self._modules_to_freeze(freeze, freeze_at)
        for module in self._frozen_modules:
            module.requires_grad_(False)
            module.eval()

    @classmethod
    def from_config(cls, cfg, input_shape: Optional[ShapeSpec] = None):
        if input_shape is not None and input_shape.channels not in (None, 3):
            # timm models are built for RGB; a 3-channel first conv is what the checkpoints hold.
            raise ValueError(
                f"TimmBackbone: expects 3 input channels, got {input_shape.channels} (len(MODEL.PIXEL_MEAN))"
            )
        timm_cfg = cfg.MODEL.TIMM
        return {
            "model_name": timm_cfg.NAME,
            "out_features": list(timm_cfg.OUT_FEATURES),
            "img_size": cfg.INPUT.IMAGE_SIZE,
            "norm_outputs": timm_cfg.NORM_OUTPUTS,
            "pretrained_weights": timm_cfg.PRETRAINED_WEIGHTS,
            "freeze": timm_cfg.FREEZE,
            "freeze_at": timm_cfg.FREEZE_AT,
            "drop_path_rate": timm_cfg.DROP_PATH_RATE,
            # YAML gives lists where timm's signatures say tuples (depths, num_heads, ...).
            "model_kwargs": {
                k: tuple(v) if isinstance(v, list) else v for k, v in timm_cfg.KWARGS.items()
            },
        }

    def _report_weight_loading(self, path: str, records: List[logging.LogRecord]) -> None:
        logger.info("TimmBackbone: loaded %s weights from %s", self.model_name, path)

        # The classifier is built, then dropped by features_only: its keys are no news.
        pretrained_cfg = timm.models.get_pretrained_cfg(self.model_name)
        classifier = getattr(pretrained_cfg, "classifier", None) or ()
        classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
        for record in records:
            message = record.getMessage()
            parsed = _UNMATCHED_KEYS.match(message)
            if parsed is None:
                if (
                    record.levelno >= logging.WARNING
                ):  # timm changed its wording: pass its warnings on as is
                    logger.warning("TimmBackbone (%s): %s", os.path.basename(path), message[:2000])
                continue
            keys = [
                key
                for key in parsed.group(2).split(", ")
                if not key.startswith(tuple(c + "." for c in classifier))
            ]
            if keys:
                # Missing keys leave random weights behind: the user should see them.
                shown = ", ".join(keys[:20]) + (
                    f", ... ({len(keys) - 20} more)" if len(keys) > 20 else ""
                )
                logger.warning(
                    "TimmBackbone: %d %s key(s) when loading %s into %s: %s",
                    len(keys),
                    parsed.group(1).lower(),
                    path,
                    self.model_name,
                    shown,
                )

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    @property
    def padding_constraints(self) -> Dict[str, int]:
        return {"size_divisibility": self._size_divisibility}

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self._frozen_modules:
            module.eval()  # frozen BatchNorm statistics and no drop-path, whatever the model's mode
        return self

    def _modules_to_freeze(self, freeze: bool, freeze_at: int) -> List[nn.Module]:
        """The trunk's modules to keep fixed: all (``freeze``) or the ``freeze_at`` prefix."""
        if freeze:
            return [self.body]
        if not 0 <= freeze_at <= 5:
            raise ValueError(
                f"TimmBackbone: MODEL.TIMM.FREEZE_AT={freeze_at}: expected 0 (nothing), 1 (the stem) "
                "or 2..5 (the stem and the stages up to res2..res5)"
            )
        if freeze_at == 0:
            return []
        # timm names a stage "layers.0" in feature_info and "layers_0" as a child of the trunk.
        stage_strides = {
            name.replace(".", "_"): stride
            for name, stride in zip(
                self.body.feature_info.module_name(), self.body.feature_info.reduction()
            )
        }
        last_frozen_stride = FEATURE_STRIDES[f"res{freeze_at}"] if freeze_at >= 2 else 2
        frozen = []
        for name, module in self.body.named_children():
            if stage_strides.get(name, 0) > last_frozen_stride:
                break
            frozen.append(module)
        return frozen

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``images`` (B, 3, H, W) with H and W divisible by 32 -> dict of NCHW maps."""
        if images.dim() != 4:
            raise ValueError(
                f"TimmBackbone: expects images (B, 3, H, W), got shape {tuple(images.shape)}"
            )
        height, width = images.shape[-2:]
        if height % self._size_divisibility or width % self._size_divisibility:
            raise ValueError(
                f"TimmBackbone: input {height}x{width} is not divisible by {self._size_divisibility}; pad the "
                f"batch with ImageList.from_tensors(..., size_divisibility=backbone.size_divisibility)"
            )
        stages = self.body(images)
        outputs = {}
        for name in self._out_features:
            feature = stages[self._stage_index[name]]
            if name in self.output_norms:
                if not self._channels_last:
                    feature = feature.permute(0, 2, 3, 1)
                feature = self.output_norms[name](
                    feature
                )  # LayerNorm runs over the last (channel) axis
                feature = feature.permute(0, 3, 1, 2)
            elif self._channels_last:
                feature = feature.permute(0, 3, 1, 2)
            outputs[name] = feature.contiguous()
        return outputs
