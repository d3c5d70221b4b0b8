#!/usr/bin/env python
"""Are a model's errors in its instance masks or in its choice of instances? Per expression template.

    python tools/analyze_instances.py --config-file output/synthetic/instalign_tiny/config.yaml \\
        --weights output/synthetic/instalign_tiny/model_final.pth [--dataset synthetic_gres_val]

For every target expression of the dataset (no-target ones are left out: they have no instance),
three IoUs at the evaluation's input resolution, from the last POT block's predictions:

  merged      the model's answer: the merged mask of Eq. 8, without the no-target decision.
  best query  for each referred object, the best IoU that any of the N instance masks reaches
              with it: can the queries segment that object at all?
  oracle      the union of the instance masks that lie at least half inside the ground truth,
              whatever their relevance scores: the answer of a perfect choice among the
              instances as they are.

``best query`` low: the instance masks are the bottleneck (the queries do not yet separate the
objects). ``oracle`` high but ``merged`` low: the masks are there and the relevance scores pick
the wrong ones (e.g. all triangles for "the leftmost triangle"). The table gives the mean of each
per template (or per expression kind where the dataset records no template); ``--json`` also
writes the numbers.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from typing import Dict, List

import numpy as np
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
from instalign_d2.utils.atomic_io import atomic_write_json  # noqa: E402

MEASURES = ("merged", "best query", "oracle")
# A query mask belongs to the oracle's answer when at least this share of it lies in the truth.
ORACLE_INSIDE_SHARE = 0.5


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """IoU of two boolean masks; 0 when both are empty (the evaluators' convention)."""
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 0.0


def best_query_ious(query_masks: torch.Tensor, object_masks: torch.Tensor) -> List[float]:
    """For each ``(M, H, W)`` object mask, the best IoU among the ``(N, H, W)`` query masks."""
    return [max(mask_iou(q, obj) for q in query_masks) for obj in object_masks]


def oracle_union(query_masks: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """The union of the non-empty query masks that lie at least half inside ``truth``."""
    inside = (query_masks & truth).flatten(1).sum(1)
    area = query_masks.flatten(1).sum(1)
    chosen = (area > 0) & (inside >= ORACLE_INSIDE_SHARE * area)
    if not bool(chosen.any()):
        return torch.zeros_like(truth)
    return query_masks[chosen].any(dim=0)


def binary_masks_at_input(logits: torch.Tensor, padded_size, input_size) -> torch.Tensor:
    """``(..., h, w)`` logits -> boolean masks at the input size (upsampled to the padded size, cropped)."""
    lead = logits.shape[:-2]
    up = F.interpolate(
        logits.reshape(-1, 1, *logits.shape[-2:]),
        size=tuple(padded_size),
        mode="bilinear",
        align_corners=False,
    )[:, 0, : input_size[0], : input_size[1]]
    return (up > 0).reshape(*lead, *up.shape[-2:])


@torch.no_grad()
def analyze(model, mapper, dataset_dicts, batch_size: int = 16) -> Dict[str, Dict[str, float]]:
    """``{group: {measure: mean IoU in %, "expressions": n}}``, and the group ``all``."""
    values = collections.defaultdict(lambda: collections.defaultdict(list))
    targets = [d for d in dataset_dicts if not d.get("empty")]
    for start in range(0, len(targets), batch_size):
        chunk = targets[start : start + batch_size]
        batch = [mapper(d) for d in chunk]
        outputs, visual, image_index = model.compute_outputs(batch)
        final = outputs["predictions"][-1]
        for i, (record, x) in enumerate(zip(chunk, batch)):
            size = visual.image_sizes[int(image_index[i])]
            truth = x["gt_mask_merged"].bool()
            queries = binary_masks_at_input(final["mask_logits"][i], visual.padded_size, size)
            merged = binary_masks_at_input(final["merged_logits"][i], visual.padded_size, size)
            objects = x["instances"].gt_masks.bool()
            group = record.get("expression_template") or record.get("expression_kind", "?")
            for key in (group, "all"):
                values[key]["merged"].append(mask_iou(merged, truth))
                values[key]["best query"].extend(best_query_ious(queries, objects))
                values[key]["oracle"].append(mask_iou(oracle_union(queries, truth), truth))
    return {
        group: {
            **{m: 100.0 * float(np.mean(v[m])) for m in MEASURES},
            "expressions": len(v["merged"]),
        }
        for group, v in values.items()
    }


def load_trained_model(config_file: str, weights: str, opts=()):
    """``(cfg, model)``: the model of ``config_file`` (+ ``opts``) on the CPU, in eval mode, with
    ``weights`` loaded (they hold the backbone: no pre-trained file is read)."""
    cfg = add_instalign_config(get_cfg())
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.TIMM.PRETRAINED_WEIGHTS = ""
    cfg.freeze()
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(weights)
    return cfg, model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", required=True, help="the checkpoint to analyze")
    parser.add_argument(
        "--dataset", default="", help="a registered split (default: DATASETS.TEST[0])"
    )
    parser.add_argument("--json", help="also write the numbers to this file")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[])
    args = parser.parse_args(argv)

    if not os.path.isfile(args.weights):
        print(f"analyze_instances: error: --weights {args.weights} not found", file=sys.stderr)
        return 2
    cfg, model = load_trained_model(args.config_file, args.weights, args.opts)
    dataset = args.dataset or cfg.DATASETS.TEST[0]
    result = analyze(model, GRESDatasetMapper(cfg, is_train=False), DatasetCatalog.get(dataset))
    groups = sorted(g for g in result if g != "all") + ["all"]
    print(f"instance masks against the choice of instances, {dataset}, weights: {args.weights}")
    print(
        tabulate(
            [
                [g, result[g]["expressions"]] + [f"{result[g][m]:.1f}" for m in MEASURES]
                for g in groups
            ],
            headers=["template", "expressions"] + [f"{m} IoU %" for m in MEASURES],
            tablefmt="github",
        )
    )
    if args.json:
        atomic_write_json(args.json, {"weights": args.weights, "dataset": dataset, **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
