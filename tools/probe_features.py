#!/usr/bin/env python
"""What does the visual path of a model know about each object? Linear probes on the synthetic set.

    python tools/probe_features.py --config-file configs/synthetic/instalign_tiny.yaml \\
        --weights output/synthetic/instalign_tiny/model_final.pth      # or --weights none

For every object of the synthetic dataset (its attributes are in ``instances.json``) the features of
each visual map are averaged over the object's visible pixels (the mask resized to the map with area
weights); a linear classifier (multinomial logistic regression, L-BFGS, small L2) is fitted on the
objects of ``--train-images`` training images and scored on those of ``--val-images`` validation
images, once per attribute (shape, colour, size) and map (the backbone's res2..res5 and the pixel
decoder's mask features). High accuracy means the attribute can be read linearly from that map;
chance is 1 / number of values. Comparing a trained model with ``--weights none`` (the model as the
config initialises it: random weights, except a backbone that MODEL.TIMM.PRETRAINED_WEIGHTS names;
add ``--opts MODEL.TIMM.PRETRAINED_WEIGHTS ""`` for a fully random one) shows what training taught
the visual path. Prints a table; ``--json`` also writes the numbers.

``--queries`` adds a row for what the decoder's queries hold of their objects: each of up to
``--expressions-per-image`` expressions with a target is run through the whole model, and every
query of its last block whose mask covers an object (IoU > 0.5 at the mask's resolution) is a
sample of that object, its feature the query itself. A low accuracy there under a high one in the
maps means the queries do not take up what the maps hold.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_util
import torch
import torch.nn.functional as F
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

import instalign_d2  # noqa: E402,F401  (registers the model and the datasets)
from instalign_d2 import add_instalign_config  # noqa: E402
from instalign_d2.data.dataset_mapper import GRESDatasetMapper  # noqa: E402
from instalign_d2.synthetic.backbone_pretraining import ATTRIBUTES, pool_over_masks  # noqa: E402
from instalign_d2.synthetic.params import (
    INSTANCES_FILE,
    read_instances,
    synthetic_root,
)  # noqa: E402
from instalign_d2.utils.atomic_io import atomic_write_json  # noqa: E402


def fit_linear_probe(
    train_x: np.ndarray, train_y: Sequence, test_x: np.ndarray, test_y: Sequence, l2: float = 1e-3
) -> float:
    """Accuracy on the test set of a multinomial logistic regression fitted on the training set.

    Features are standardised with the training statistics; labels are any hashable values.
    """
    classes = sorted(set(train_y))
    index = {c: i for i, c in enumerate(classes)}
    # A test label never seen in training can only be wrong: map it to an impossible class.
    ya = torch.tensor([index[c] for c in train_y])
    yb = torch.tensor([index.get(c, -1) for c in test_y])
    xa = torch.as_tensor(train_x, dtype=torch.float64)
    xb = torch.as_tensor(test_x, dtype=torch.float64)
    mean, std = xa.mean(0), xa.std(0).clamp(min=1e-6)
    xa, xb = (xa - mean) / std, (xb - mean) / std
    linear = torch.nn.Linear(xa.shape[1], len(classes)).double()
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(xa), ya) + l2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float((linear(xb).argmax(1) == yb).double().mean())


def object_features(
    model, mapper, split: str, num_images: int, annotations_by_image
) -> Tuple[Dict[str, np.ndarray], Dict[str, List]]:
    """Pooled features of every object in the first ``num_images`` images of ``split``."""
    features: Dict[str, List[np.ndarray]] = collections.defaultdict(list)
    labels: Dict[str, List] = collections.defaultdict(list)
    seen = set()
    for record in DatasetCatalog.get(split):
        if record["image_id"] in seen:
            continue
        if len(seen) == num_images:
            break
        seen.add(record["image_id"])
        sample = mapper(record)
        with torch.no_grad():
            images = model.preprocess([sample])
            backbone_maps = model.backbone(images.tensor)
            # encode_images' visual path, split open so the backbone runs once for both kinds of map
            mask_features, decoder_levels = model.pixel_decoder.forward_features(backbone_maps)
            maps = {k: v[0] for k, v in backbone_maps.items()}
            # the maps the POT blocks' cross-attention reads, named by stride
            for level in decoder_levels:
                maps[f"decoder_s{images.tensor.shape[-1] // level.shape[-1]}"] = level[0]
            maps["mask_features"] = mask_features[0]
        height, width = images.image_sizes[0]
        for annotation in annotations_by_image[record["image_id"]]:
            mask = torch.from_numpy(mask_util.decode(annotation["segmentation"]))
            mask = F.interpolate(mask[None, None].float(), size=(height, width), mode="nearest")[
                0, 0
            ]
            mask = F.pad(
                mask, (0, images.tensor.shape[-1] - width, 0, images.tensor.shape[-2] - height)
            )
            for name, feature_map in maps.items():
                features[name].append(pool_over_masks(feature_map, mask[None])[0].numpy())
            for attribute in ATTRIBUTES:
                labels[attribute].append(annotation[attribute])
    return {k: np.stack(v) for k, v in features.items()}, labels


QUERY_MATCH_IOU = 0.5  # a query stands for an object when its mask covers it this well


def object_masks_at(annotations, image_size: Tuple[int, int], grid: Tuple[int, int]):
    """``(M, *grid)`` bool: each object's mask resized to the model's input ``image_size``, padded
    as the input is (the mask logits cover the padded input at stride 4) and resized to ``grid``."""
    height, width = image_size
    padded_height, padded_width = 4 * grid[0], 4 * grid[1]
    masks = torch.stack(
        [torch.from_numpy(mask_util.decode(a["segmentation"])).float() for a in annotations]
    )[:, None]
    masks = F.interpolate(masks, size=(height, width), mode="nearest")
    masks = F.pad(masks, (0, padded_width - width, 0, padded_height - height))
    return F.interpolate(masks, size=grid, mode="area")[:, 0] > 0.5


def query_features(
    model, mapper, split: str, num_images: int, annotations_by_image, per_image: int
) -> Tuple[np.ndarray, Dict[str, List]]:
    """The last block's queries that cover an object, for up to ``per_image`` expressions with a
    target in each of the first ``num_images`` images of ``split``, and their objects' attributes.
    """
    features: List[np.ndarray] = []
    labels: Dict[str, List] = collections.defaultdict(list)
    asked: Dict[int, int] = collections.Counter()
    encoded = (None, None, None)  # image id, visual features, object masks of the last image
    for record in DatasetCatalog.get(split):
        image_id = record["image_id"]
        if record.get("empty") or asked[image_id] == per_image:
            continue
        if image_id not in asked and len(asked) == num_images:
            continue
        asked[image_id] += 1
        sample = mapper(record)
        with torch.no_grad():
            if encoded[0] != image_id:  # an image's expressions share its visual pass
                encoded = (image_id, model.encode_images([sample]), None)
            input_ids, attention_mask = model.text_inputs([sample])
            outputs = model.decode_expressions(
                encoded[1], torch.zeros(1, dtype=torch.long), input_ids, attention_mask
            )
        last = outputs["predictions"][-1]
        queries, masks = last["queries"][0], last["mask_logits"][0].sigmoid() > 0.5
        annotations = annotations_by_image[image_id]
        if not annotations:
            continue
        if encoded[2] is None:
            grid = tuple(masks.shape[-2:])
            encoded = (*encoded[:2], object_masks_at(annotations, sample["image"].shape[-2:], grid))
        objects = encoded[2]
        intersection = torch.einsum("nhw,mhw->nm", masks.float(), objects.float())
        union = masks.sum((1, 2))[:, None] + objects.sum((1, 2))[None] - intersection
        iou = intersection / union.clamp_min(1)  # (queries, objects)
        best_iou, best = iou.max(dim=1)
        for query, covered, index in zip(queries, best_iou > QUERY_MATCH_IOU, best.tolist()):
            if covered:
                features.append(query.numpy())
                for attribute in ATTRIBUTES:
                    labels[attribute].append(annotations[index][attribute])
    return np.stack(features), labels


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True)
    parser.add_argument(
        "--weights",
        required=True,
        help="a checkpoint, or 'none' for the model as the config initialises it (random weights, but the "
        "backbone from MODEL.TIMM.PRETRAINED_WEIGHTS when set; --opts MODEL.TIMM.PRETRAINED_WEIGHTS '' for none)",
    )
    parser.add_argument("--train-images", type=int, default=400)
    parser.add_argument("--val-images", type=int, default=200)
    parser.add_argument(
        "--queries",
        action="store_true",
        help="also probe the last block's queries of expressions with a target (the whole model runs)",
    )
    parser.add_argument("--expressions-per-image", type=int, default=2)
    parser.add_argument("--json", help="also write the accuracies to this file")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[])
    args = parser.parse_args(argv)

    cfg = add_instalign_config(get_cfg())
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.MODEL.DEVICE = "cpu"
    if args.weights != "none":
        cfg.MODEL.TIMM.PRETRAINED_WEIGHTS = (
            ""  # the checkpoint holds the backbone: nothing else to read
        )
    cfg.freeze()
    instances_path = os.path.join(synthetic_root(), INSTANCES_FILE)
    if not os.path.isfile(instances_path):
        print(
            f"probe_features: error: {instances_path} not found; generate the synthetic dataset first "
            "(python -m instalign_d2.synthetic, or make train)",
            file=sys.stderr,
        )
        return 2
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    if args.weights != "none":
        if not os.path.isfile(args.weights):
            print(f"probe_features: error: --weights {args.weights} not found", file=sys.stderr)
            return 2
        DetectionCheckpointer(model).load(args.weights)
    annotations = read_instances(synthetic_root())["annotations"]
    by_image = collections.defaultdict(list)
    for annotation in annotations:
        by_image[annotation["image_id"]].append(annotation)

    mapper = GRESDatasetMapper(cfg, is_train=False)
    train_x, train_labels = object_features(
        model, mapper, "synthetic_gres_train", args.train_images, by_image
    )
    val_x, val_labels = object_features(
        model, mapper, "synthetic_gres_val", args.val_images, by_image
    )
    accuracy = {
        name: {
            a: 100 * fit_linear_probe(train_x[name], train_labels[a], val_x[name], val_labels[a])
            for a in ATTRIBUTES
        }
        for name in train_x
    }
    if args.queries:
        splits = [
            query_features(model, mapper, split, count, by_image, args.expressions_per_image)
            for split, count in (
                ("synthetic_gres_train", args.train_images),
                ("synthetic_gres_val", args.val_images),
            )
        ]
        (query_train, query_train_labels), (query_val, query_val_labels) = splits
        accuracy["queries (last block)"] = {
            a: 100
            * fit_linear_probe(query_train, query_train_labels[a], query_val, query_val_labels[a])
            for a in ATTRIBUTES
        }
        print(
            f"queries: {len(query_train)} training / {len(query_val)} validation queries that cover an object"
        )
    chance = {a: 100 / len(set(train_labels[a])) for a in ATTRIBUTES}
    rows = [[name] + [f"{accuracy[name][a]:.1f}" for a in ATTRIBUTES] for name in sorted(accuracy)]
    rows.append(["(chance)"] + [f"{chance[a]:.1f}" for a in ATTRIBUTES])
    print(
        f"linear probes, {len(train_labels['shape'])} training / {len(val_labels['shape'])} validation objects, "
        f"weights: {args.weights}"
    )
    print(
        tabulate(rows, headers=["features"] + [f"{a} acc %" for a in ATTRIBUTES], tablefmt="github")
    )
    if args.json:
        atomic_write_json(
            args.json, {"weights": args.weights, "accuracy": accuracy, "chance": chance}
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
