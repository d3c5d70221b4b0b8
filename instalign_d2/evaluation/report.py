"""From gathered per-sample results to the numbers users see: returned dict, log table, JSON file.

Shared by :class:`GRESEvaluator` and ``tools/eval_predictions.py`` so both report alike.
"""

import logging
import os
from collections import OrderedDict
from dataclasses import asdict
from typing import Dict, List, Optional, Sequence, Tuple

from tabulate import tabulate

from instalign_d2.utils.atomic_io import atomic_write_json

from .metrics import (
    EXPRESSION_KINDS,
    GREFCOCO_PR_THRESHOLDS,
    RES_PR_THRESHOLDS,
    SampleResult,
    compute_metrics,
    count_by_kind,
    count_by_template,
    dedupe,
)

# (image_id, sent_id, reason) of a sample the mapper could not read
SkippedSample = Tuple[object, object, str]


def results_path(output_dir: str, dataset_name: str) -> str:
    return os.path.join(output_dir, f"{dataset_name}_results.json")


def per_sample_path(output_dir: str, dataset_name: str) -> str:
    return os.path.join(output_dir, f"{dataset_name}_per_sample.json")


def result_task_name(evaluator_type: str, eval_resolution: str) -> str:
    """Top-level key of the results: ``grefcoco`` or, at the original resolution, ``grefcoco_original``."""
    return evaluator_type if eval_resolution == "input" else f"{evaluator_type}_{eval_resolution}"


def summarize_results(
    dataset_name: str,
    evaluator_type: str,
    results: Sequence[SampleResult],
    skipped: Sequence[SkippedSample] = (),
    output_dir: Optional[str] = None,
    eval_resolution: str = "input",
    logger: Optional[logging.Logger] = None,
) -> "OrderedDict[str, Dict[str, float]]":
    """Dedupe, score, log and (with ``output_dir``) write ``<dataset>_results.json``.

    Returns ``{task: {metric: percent, ..., "num_expressions": n, "num_skipped": k}}``, the
    nested dict of floats that Detectron2's ``print_csv_format`` and ``EvalHook`` expect (metric
    names carry no '-', which ``print_csv_format`` would hide). ``task`` is the evaluator type, with
    ``_original`` appended at the original resolution so those numbers are never taken for the
    public evaluators' (which compare at the mapper's resolution).
    """
    logger = logger or logging.getLogger(__name__)
    unique, duplicates = dedupe(results)
    skipped_unique = sorted(
        {(s[0], s[1]): s for s in skipped}.values(), key=lambda s: (str(s[0]), str(s[1]))
    )
    if duplicates:
        logger.warning(
            f"{dataset_name}: dropped {duplicates} repeated predictions of the same expression"
        )
    if skipped_unique:
        examples = "; ".join(f"image_id={i} sent_id={s}: {r}" for i, s, r in skipped_unique[:5])
        logger.warning(
            f"{dataset_name}: left {len(skipped_unique)} unreadable samples out of the metrics, e.g. {examples}"
        )

    counts = {"num_expressions": len(unique), "num_skipped": len(skipped_unique)}
    if unique:
        metrics = compute_metrics(evaluator_type, unique)
    else:
        logger.warning(f"{dataset_name}: no expressions to evaluate; returning counts only")
        metrics = {}
    family_results = dict(metrics)
    family_results.update(counts)
    output = OrderedDict([(result_task_name(evaluator_type, eval_resolution), family_results)])

    if unique:
        by_kind = count_by_kind(unique, evaluator_type)
        by_template = count_by_template(unique) if evaluator_type == "grefcoco" else {}
        table = format_table(evaluator_type, metrics, len(unique), by_kind)
        if by_template:
            table += "\n\nBy expression template:\n" + template_table(metrics, by_template)
        logger.info(
            f"Evaluation of {dataset_name} ({evaluator_type} metrics, {eval_resolution} resolution, "
            f"{len(unique)} expressions):\n" + table
        )
    else:
        by_kind, by_template = {}, {}
    if output_dir:
        atomic_write_json(
            results_path(output_dir, dataset_name),
            {
                "dataset": dataset_name,
                "evaluator_type": evaluator_type,
                "eval_resolution": eval_resolution,
                "results": output,
                "counts": {
                    **counts,
                    "duplicates_dropped": duplicates,
                    "by_kind": by_kind,
                    "by_template": by_template,
                },
                "skipped": [
                    {"image_id": i, "sent_id": s, "reason": r} for i, s, r in skipped_unique
                ],
            },
        )
        atomic_write_json(
            per_sample_path(output_dir, dataset_name), [asdict(r) for r in unique], indent=None
        )
    return output


def _cell(metrics: Dict[str, float], name: str) -> str:
    return f"{metrics[name]:.2f}" if name in metrics else "-"


def format_table(
    evaluator_type: str, metrics: Dict[str, float], num_expressions: int, by_kind: Dict[str, int]
) -> str:
    """A readable table of one family's metrics with its per-kind break-down."""
    if evaluator_type == "grefcoco":
        return _grefcoco_table(metrics, num_expressions, by_kind)
    if evaluator_type == "refzom":
        return _refzom_table(metrics, num_expressions, by_kind)
    names = ["oIoU", "mIoU"] + [f"Pr@{t:.1f}" for t in RES_PR_THRESHOLDS]
    return tabulate(
        [[num_expressions] + [_cell(metrics, n) for n in names]],
        headers=["expressions"] + names,
        tablefmt="pipe",
        disable_numparse=True,
    )


def _grefcoco_table(
    metrics: Dict[str, float], num_expressions: int, by_kind: Dict[str, int]
) -> str:
    names = ["cIoU", "gIoU", "N_acc", "T_acc"] + [f"Pr@{t:.1f}" for t in GREFCOCO_PR_THRESHOLDS]
    rows: List[list] = [["all", num_expressions] + [_cell(metrics, n) for n in names]]
    for kind in EXPRESSION_KINDS:
        if by_kind.get(kind):
            rows.append([kind, by_kind[kind]] + [_cell(metrics, f"{n}_{kind}") for n in names])
    headers = ["expressions", "count"] + [n.replace("_", "-") for n in names]
    return tabulate(rows, headers=headers, tablefmt="pipe", disable_numparse=True)


def template_table(metrics: Dict[str, float], by_template: Dict[str, int]) -> str:
    """gIoU, cIoU and N-acc or T-acc of each expression template (gRefCOCO family)."""
    names = ("gIoU", "cIoU", "N_acc", "T_acc")
    rows = [
        [template, count] + [_cell(metrics, f"{name}_template_{template}") for name in names]
        for template, count in by_template.items()
    ]
    headers = ["template", "count"] + [name.replace("_", "-") for name in names]
    return tabulate(rows, headers=headers, tablefmt="pipe", disable_numparse=True)


# The paper's Table 4: oIoU / mIoU per one-to-one and one-to-many, Acc for one-to-zero.
_REFZOM_TABLE4_COLUMNS = [
    ("one-to-one oIoU", "oIoU_one_to_one"),
    ("one-to-one mIoU", "mIoU_one_to_one"),
    ("one-to-many oIoU", "oIoU_one_to_many"),
    ("one-to-many mIoU", "mIoU_one_to_many"),
    ("one-to-zero Acc", "Acc"),
]


def _refzom_table(metrics: Dict[str, float], num_expressions: int, by_kind: Dict[str, int]) -> str:
    table4 = tabulate(
        [[_cell(metrics, key) for _, key in _REFZOM_TABLE4_COLUMNS]],
        headers=[header for header, _ in _REFZOM_TABLE4_COLUMNS],
        tablefmt="pipe",
        disable_numparse=True,
    )
    names = ["oIoU", "mIoU", "Acc"] + [f"Pr@{t:.1f}" for t in RES_PR_THRESHOLDS]
    overall = tabulate(
        [[num_expressions] + [_cell(metrics, n) for n in names]],
        headers=["expressions"] + names,
        tablefmt="pipe",
        disable_numparse=True,
    )
    kinds = ", ".join(f"{k}: {by_kind[k]}" for k in sorted(by_kind))
    return f"{overall}\n\nBy case ({kinds}):\n{table4}"
