"""InstAlign as a Detectron2 meta-architecture (paper Fig. 2).

    image ──> backbone ──> pixel decoder ──> V1..V3 (strides 32/16/8), V4 (stride 4)
    expression ──> text encoder ──> T0                                   │
    (Q0, T0, V) ──> Phrase-Object Transformer, K blocks ──> per block: relevance p, masks s, Q_k, T_k
    (s, p) ──> Adaptive Instance Aggregation ──> merged mask           (Eq. 8)
    (Q_K, p, T_K) ──> No-Target Predictor ──> p_nt                       (Eq. 10-12)

Training returns the losses of Eq. 13 (``InstAlignCriterion``); inference returns, per input,
the dict of docs/interfaces.md §3. The visual path runs once per distinct image
(:meth:`InstAlign.encode_images`) and the expression path once per expression
(:meth:`InstAlign.decode_expressions`), so the expressions of one image share its features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import BitMasks, ImageList, Instances
from torch import nn

from .modeling.aggregation import InstanceAggregation, NoTargetHead
from .modeling.criterion import InstAlignCriterion, phrase_token_weights
from .modeling.dense_category import IGNORE_INDEX, DenseCategoryHead
from .modeling.language import build_text_encoder
from .modeling.pixel_decoder import build_pixel_decoder
from .modeling.transformer_decoder import build_transformer_decoder

__all__ = ["InstAlign", "VisualFeatures"]


@dataclass
class VisualFeatures:
    """What the visual path computes for a batch of distinct images.

    ``mask_features`` V4 ``(I, D, Hp/4, Wp/4)``; ``multi_scale_features`` [V1, V2, V3];
    ``image_sizes`` the (h, w) of each image before padding to ``padded_size`` (Hp, Wp).
    """

    mask_features: torch.Tensor
    multi_scale_features: List[torch.Tensor]
    image_sizes: List[Tuple[int, int]]
    padded_size: Tuple[int, int]


@META_ARCH_REGISTRY.register()
class InstAlign(nn.Module):
    """Instance-aware GRES: segments the instances an expression refers to and merges them."""

    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        pixel_decoder: nn.Module,
        text_encoder: nn.Module,
        transformer_decoder: nn.Module,
        aggregation: InstanceAggregation,
        no_target_head: NoTargetHead,
        criterion: InstAlignCriterion,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        input_format: str = "RGB",
        size_divisibility: int = 32,
        no_target_threshold: float = 0.5,
        mask_threshold: float = 0.5,
        instance_score_threshold: float = 0.5,
        max_instances: int = 10,
        dense_category_head: Optional[DenseCategoryHead] = None,
    ):
        """
        Args:
            backbone, pixel_decoder, text_encoder, transformer_decoder, aggregation, no_target_head,
                criterion: the parts of Fig. 2 and the training objective.
            pixel_mean, pixel_std: per-channel normalisation, in the channel order of ``input_format``.
            input_format: channel order of the input images ("RGB" or "BGR"); the backbone is
                expected to take that order (timm: RGB, detectron2's ResNet: BGR).
            size_divisibility: images are zero-padded to a multiple of this (the backbone's stride).
            no_target_threshold: p_nt above it -> the expression is answered with an empty mask.
            mask_threshold: instance mask probability -> ``pred_masks``.
            instance_score_threshold, max_instances: which instances the inference output lists.
            dense_category_head: not in the paper; a per-pixel category loss on the mask features
                in training (``modeling/dense_category.py``), None without.
        """
        super().__init__()
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.text_encoder = text_encoder
        self.transformer_decoder = transformer_decoder
        self.aggregation = aggregation
        self.no_target_head = no_target_head
        self.criterion = criterion
        if len(pixel_mean) != 3 or len(pixel_std) != 3:
            raise ValueError(
                f"MODEL.PIXEL_MEAN / PIXEL_STD need 3 values each, got {pixel_mean} / {pixel_std}"
            )
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.input_format = input_format
        self.size_divisibility = max(
            size_divisibility, getattr(backbone, "size_divisibility", 0) or 0
        )
        self.no_target_threshold = no_target_threshold
        self.mask_threshold = mask_threshold
        self.instance_score_threshold = instance_score_threshold
        self.max_instances = max_instances
        self.dense_category_head = dense_category_head

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        text_encoder = build_text_encoder(cfg)
        test = cfg.MODEL.INSTALIGN.TEST
        dense_weight = cfg.MODEL.INSTALIGN.DENSE_CATEGORY_WEIGHT
        return {
            "backbone": backbone,
            "pixel_decoder": build_pixel_decoder(cfg, backbone.output_shape()),
            "text_encoder": text_encoder,
            "transformer_decoder": build_transformer_decoder(
                cfg,
                cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM,
                cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
                text_encoder.out_dim,
            ),
            "aggregation": InstanceAggregation(cfg),
            "no_target_head": NoTargetHead(cfg),
            "criterion": InstAlignCriterion(cfg),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "input_format": cfg.INPUT.FORMAT,
            "size_divisibility": cfg.MODEL.INSTALIGN.SIZE_DIVISIBILITY,
            "no_target_threshold": test.NO_TARGET_THRESHOLD,
            "mask_threshold": test.MASK_THRESHOLD,
            "instance_score_threshold": test.INSTANCE_SCORE_THRESH,
            "max_instances": test.MAX_INSTANCES,
            "dense_category_head": (
                DenseCategoryHead(
                    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
                    cfg.MODEL.INSTALIGN.CATEGORY_CLASSES,
                    dense_weight,
                )
                if dense_weight > 0
                else None
            ),
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    # ------------------------------------------------------------------ Fig. 2, visual path
    def preprocess(self, batched_inputs: Sequence[Dict]) -> ImageList:
        """Normalise the ``(3, H, W)`` images (channels in ``input_format``) and pad them to one size."""
        images = []
        for x in batched_inputs:
            image = x["image"]
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(
                    f"InstAlign: 'image' must be (3, H, W) in {self.input_format} order, got {tuple(image.shape)} "
                    f"({x.get('file_name', 'input')})"
                )
            images.append((image.to(self.device).float() - self.pixel_mean) / self.pixel_std)
        return ImageList.from_tensors(images, self.size_divisibility)

    def encode_images(self, batched_inputs: Sequence[Dict]) -> VisualFeatures:
        """Backbone + pixel decoder for each input's ``image`` (pass each distinct image once)."""
        images = self.preprocess(batched_inputs)
        features = self.backbone(images.tensor)
        mask_features, multi_scale_features = self.pixel_decoder.forward_features(features)
        return VisualFeatures(
            mask_features=mask_features,
            multi_scale_features=list(multi_scale_features),
            image_sizes=[tuple(s) for s in images.image_sizes],
            padded_size=tuple(images.tensor.shape[-2:]),
        )

    # ------------------------------------------------------------------ Fig. 2, expression path
    def decode_expressions(
        self,
        visual_features: VisualFeatures,
        image_index: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> Dict:
        """Text encoder, POT decoder, heads, AIA and no-target head for E expressions.

        Args:
            visual_features: from :meth:`encode_images`.
            image_index: ``(E,)`` which encoded image each expression is about.
            input_ids, attention_mask: ``(E, L)`` token ids and mask (1 = real token).
        Returns:
            the decoder's ``predictions`` (K + 1 dicts; the last gains ``merged_logits (E, h, w)``,
            and in training every one does when the criterion supervises them all),
            ``text_pad_mask (E, L)`` and ``no_target_logits (E,)``.
        """
        if (attention_mask.sum(dim=1) == 0).any():
            raise ValueError(
                "InstAlign: an expression has no tokens (attention_mask all 0); tokenise it with the text encoder."
            )
        image_index = torch.as_tensor(image_index, dtype=torch.long, device=self.device)

        text, text_pad_mask = self.text_encoder(
            input_ids.to(self.device), attention_mask.to(self.device)
        )  # T0
        # The decoder reads each image's features through image_index: projected and multiplied
        # once per image, not copied once per expression.
        outputs = self.transformer_decoder(
            visual_features.multi_scale_features,
            visual_features.mask_features,
            text,
            text_pad_mask,
            image_index,
        )  # POT, K blocks
        predictions = outputs["predictions"]
        merge_every = self.training and self.criterion.merged_loss_on_every_prediction
        for prediction in predictions if merge_every else predictions[-1:]:
            prediction["merged_logits"] = self.aggregation(
                prediction["mask_logits"], prediction["relevance_logits"]
            )  # Eq. 8
        final = predictions[-1]
        outputs["no_target_logits"] = self.no_target_head(
            final["queries"], final["relevance_logits"], final["text"], outputs["text_pad_mask"]
        )  # Eq. 10-12
        return outputs

    # ------------------------------------------------------------------ Fig. 2, both paths
    def compute_outputs(
        self, batched_inputs: Sequence[Dict]
    ) -> Tuple[Dict, VisualFeatures, torch.Tensor]:
        """Both paths of Fig. 2 for a batch: :meth:`decode_expressions`' outputs, the visual features
        and, per input, the index of its image among them.

        Inputs that show the same image (``file_name`` and pixels, e.g. the expressions of one image
        with DATALOADER.TRAIN_EXPRESSIONS_PER_IMAGE, or a test batch) share one visual pass.
        """
        representatives, image_index = self.group_by_image(batched_inputs)
        visual_features = self.encode_images([batched_inputs[i] for i in representatives])
        input_ids, attention_mask = self.text_inputs(batched_inputs)
        outputs = self.decode_expressions(visual_features, image_index, input_ids, attention_mask)
        return outputs, visual_features, image_index

    def forward(self, batched_inputs: List[Dict]):
        """Training: dict of losses (Eq. 13). Inference: one dict per input (docs/interfaces.md §3)."""
        if not self.training:
            return self.inference(batched_inputs)
        outputs, visual_features, image_index = self.compute_outputs(batched_inputs)
        losses = self.criterion(
            outputs, self.prepare_targets(batched_inputs, visual_features.padded_size)
        )
        if self.dense_category_head is not None:
            losses["loss_dense_category"] = self.dense_category_head.loss(
                visual_features.mask_features,
                self.category_maps(batched_inputs, image_index, visual_features.padded_size),
            )
        return losses

    # ------------------------------------------------------------------ inputs and targets
    def text_inputs(self, batched_inputs: Sequence[Dict]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(E, L)`` ids and attention mask: the mapper's ``input_ids``/``attention_mask``, or the
        raw ``sentence`` (a string or ``{"raw": ...}``) tokenised with the text encoder's tokenizer.
        """
        to_tokenize = [
            i
            for i, x in enumerate(batched_inputs)
            if "input_ids" not in x or "attention_mask" not in x
        ]
        tokenized = {}
        if to_tokenize:
            sentences = []
            for i in to_tokenize:
                sentence = batched_inputs[i].get("sentence")
                if isinstance(sentence, dict):
                    sentence = sentence.get("raw", sentence.get("sent"))
                if not isinstance(sentence, str):
                    raise ValueError(
                        "InstAlign: each input needs 'input_ids' and 'attention_mask' (the GRES mapper's) or a "
                        f"'sentence' string / {{'raw': str}} dict; input {i} has neither."
                    )
                sentences.append(sentence)
            encoded = self.text_encoder.tokenize(sentences)
            tokenized = {
                i: (encoded["input_ids"][j], encoded["attention_mask"][j])
                for j, i in enumerate(to_tokenize)
            }
        ids, masks = [], []
        for i, x in enumerate(batched_inputs):
            token_ids, mask = (
                tokenized[i] if i in tokenized else (x["input_ids"], x["attention_mask"])
            )
            ids.append(torch.as_tensor(token_ids).reshape(-1))
            masks.append(torch.as_tensor(mask).reshape(-1))
        lengths = {t.numel() for t in ids}
        if len(lengths) > 1:
            raise ValueError(
                f"InstAlign: expressions of one batch have different token lengths {sorted(lengths)}; the mapper pads "
                "them to MODEL.TEXT_ENCODER.MAX_TOKENS — tokenise all inputs the same way."
            )
        return torch.stack(ids).long().to(self.device), torch.stack(masks).long().to(self.device)

    def prepare_targets(
        self, batched_inputs: Sequence[Dict], padded_size: Tuple[int, int]
    ) -> List[Dict[str, torch.Tensor]]:
        """Ground truth per expression, zero-padded like the images: ``masks (M, Hp, Wp)`` bool,
        ``merged_mask (Hp, Wp)`` bool (their union), ``empty`` (no target) and ``classes (M,)``
        (their category ids; None when the instances have no ``gt_classes``)."""
        targets = []
        for x in batched_inputs:
            if "instances" not in x:
                raise ValueError(
                    "InstAlign: training inputs need 'instances' (gt_masks), 'gt_mask_merged' and 'empty' from the "
                    f"GRES mapper (INPUT.DATASET_MAPPER_NAME: gres); {x.get('file_name', 'an input')} has no 'instances'."
                )
            gt_masks = x["instances"].gt_masks
            gt_masks = (
                (gt_masks.tensor if isinstance(gt_masks, BitMasks) else gt_masks)
                .to(self.device)
                .bool()
            )
            merged = x.get("gt_mask_merged")
            merged = (
                gt_masks.any(dim=0)
                if merged is None
                else torch.as_tensor(merged, device=self.device).bool()
            )
            empty = bool(x.get("empty", gt_masks.shape[0] == 0))
            if empty and gt_masks.shape[0] > 0:
                raise ValueError(
                    f"InstAlign: {x.get('file_name', 'an input')} is marked empty (no target) but has "
                    f"{gt_masks.shape[0]} instance masks; the mapper must give M = 0 for a no-target expression."
                )
            targets.append(
                {
                    "masks": _pad_to(gt_masks, padded_size),
                    "merged_mask": _pad_to(merged, padded_size),
                    "empty": empty,
                    "classes": (
                        x["instances"].gt_classes.to(self.device)
                        if x["instances"].has("gt_classes")
                        else None
                    ),
                }
            )
        return targets

    def category_maps(
        self,
        batched_inputs: Sequence[Dict],
        image_index: torch.Tensor,
        padded_size: Tuple[int, int],
    ) -> torch.Tensor:
        """``(I, Hp, Wp)`` long: the mapper's ``category_map`` of each encoded image, padded with
        the dense head's ignore index."""
        first_input = {}
        for i, group in enumerate(image_index.tolist()):
            first_input.setdefault(group, i)
        maps = []
        for group in range(len(first_input)):
            x = batched_inputs[first_input[group]]
            if "category_map" not in x:
                raise ValueError(
                    "InstAlign: MODEL.INSTALIGN.DENSE_CATEGORY_WEIGHT > 0 needs each training input's "
                    f"'category_map', which the GRES mapper makes from the dataset dict's "
                    f"'image_annotations'; {x.get('file_name', 'an input')} has none. Train on a split "
                    "that lists each image's objects (synthetic_gres_train_shape_colour) or set the "
                    "weight to 0."
                )
            category_map = torch.as_tensor(x["category_map"], device=self.device).long()
            h, w = category_map.shape
            maps.append(
                F.pad(
                    category_map,
                    (0, padded_size[1] - w, 0, padded_size[0] - h),
                    value=IGNORE_INDEX,
                )
            )
        return torch.stack(maps)

    def group_by_image(self, batched_inputs: Sequence[Dict]) -> Tuple[List[int], torch.Tensor]:
        """Inputs sharing ``file_name`` and an identical image tensor form one group.

        Returns the index of one representative input per group and, for every input, its group.
        """
        representatives: List[int] = []
        groups_of_name: Dict[str, List[int]] = {}
        image_index = []
        for i, x in enumerate(batched_inputs):
            name = x.get("file_name")
            group = None
            if name is not None:
                for g in groups_of_name.get(name, []):
                    other = batched_inputs[representatives[g]]["image"]
                    if other is x["image"] or (
                        other.shape == x["image"].shape and torch.equal(other, x["image"])
                    ):
                        group = g
                        break
            if group is None:
                group = len(representatives)
                representatives.append(i)
                if name is not None:
                    groups_of_name.setdefault(name, []).append(group)
            image_index.append(group)
        return representatives, torch.as_tensor(image_index, dtype=torch.long)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def inference(self, batched_inputs: List[Dict]) -> List[Dict]:
        """One dict per input (docs/interfaces.md §3)."""
        outputs, visual_features, image_index = self.compute_outputs(batched_inputs)
        return self.postprocess(outputs, visual_features, image_index, batched_inputs)

    def postprocess(
        self,
        outputs: Dict,
        visual_features: VisualFeatures,
        image_index: torch.Tensor,
        batched_inputs: Sequence[Dict],
    ) -> List[Dict]:
        """Per expression: ``ref_seg`` (original size), ``ref_seg_input`` (input size), ``nt_prob``
        and the relevant ``instances`` (docs/interfaces.md §3)."""
        final = outputs["predictions"][-1]
        token_weights = phrase_token_weights(
            final["queries"], final["text"], outputs["text_pad_mask"]
        )  # R of Eq. 1
        no_target_probs = outputs["no_target_logits"].sigmoid()
        results = []
        for i, x in enumerate(batched_inputs):
            input_size = visual_features.image_sizes[int(image_index[i])]
            output_size = (int(x.get("height", input_size[0])), int(x.get("width", input_size[1])))
            nt_prob = no_target_probs[i]
            no_target = bool(nt_prob > self.no_target_threshold)

            merged_input = self._to_input_size(
                final["merged_logits"][i : i + 1], visual_features.padded_size, input_size
            )
            ref_seg_input = merged_input[0].sigmoid()
            ref_seg = _resize(merged_input, output_size)[0].sigmoid()
            if no_target:  # paper §3.6: a no-target expression is answered with an all-zero mask
                ref_seg_input, ref_seg = torch.zeros_like(ref_seg_input), torch.zeros_like(ref_seg)

            scores = final["relevance_logits"][i].sigmoid()
            keep = torch.nonzero(scores > self.instance_score_threshold).flatten()
            if no_target:
                keep = keep[:0]
            keep = keep[scores[keep].argsort(descending=True)][: self.max_instances]
            masks = self._to_input_size(
                final["mask_logits"][i, keep], visual_features.padded_size, input_size
            )
            instances = Instances(output_size)
            instances.pred_masks = _resize(masks, output_size).sigmoid() > self.mask_threshold
            instances.scores = scores[keep]
            instances.token_weights = token_weights[i, keep]
            results.append(
                {
                    "ref_seg": ref_seg,
                    "ref_seg_input": ref_seg_input,
                    "nt_prob": nt_prob,
                    "instances": instances,
                }
            )
        return results

    @staticmethod
    def _to_input_size(
        logits: torch.Tensor, padded_size: Tuple[int, int], input_size: Tuple[int, int]
    ) -> torch.Tensor:
        """``(n, h, w)`` stride-4 logits -> ``(n, H, W)`` at the input's size (upsample, drop the padding)."""
        return _resize(logits, padded_size)[:, : input_size[0], : input_size[1]]


def _resize(logits: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``(n, h, w)`` logits to ``(n, *size)``; ``n`` may be 0."""
    if logits.shape[0] == 0:
        return logits.new_zeros((0, *size))
    return F.interpolate(logits[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def _pad_to(mask: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Zero-pad the last two dims of a bool mask to ``size`` (bottom/right, like the images)."""
    height, width = mask.shape[-2:]
    if (height, width) == tuple(size):
        return mask
    if height > size[0] or width > size[1]:
        raise ValueError(
            f"InstAlign: ground-truth mask {height}x{width} is larger than the padded image {size}"
        )
    return F.pad(mask, (0, size[1] - width, 0, size[0] - height))
