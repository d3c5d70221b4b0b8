"""The few lines a training run ends with: its metrics, its time, where its files are, what next."""

from __future__ import annotations

import glob
import os
from typing import Dict, Mapping, Optional, Sequence

from detectron2.data import MetadataCatalog
from tabulate import tabulate

# The headline metrics of each family, in the order the papers report them.
HEADLINE_METRICS = {
    "grefcoco": ("gIoU", "cIoU", "N_acc", "T_acc"),
    "grefcoco_original": ("gIoU", "cIoU", "N_acc", "T_acc"),
    "refzom": ("oIoU", "mIoU", "Acc"),
    "refcoco": ("oIoU", "mIoU"),
}


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def metrics_table(results: Optional[Mapping[str, Mapping]], datasets: Sequence[str]) -> str:
    """One row per evaluated dataset with its family's headline metrics (percent).

    ``results`` is what Detectron2's ``test`` returns: ``{dataset: {task: metrics}}``, or
    ``{task: metrics}`` itself when there is one dataset (``datasets`` names it then).
    """
    results = results or {}
    if (
        len(datasets) == 1
        and results
        and all(
            isinstance(v, (int, float)) for metrics in results.values() for v in metrics.values()
        )
    ):
        results = {datasets[0]: results}
    rows = []
    for dataset, tasks in results.items():
        for task, metrics in tasks.items():
            names = HEADLINE_METRICS.get(task, tuple(k for k in metrics if k[0].isupper()))
            rows.append(
                [dataset]
                + [f"{n.replace('_', '-')} {metrics[n]:.1f}" for n in names if n in metrics]
            )
    if not rows:
        return "(no evaluation: DATASETS.TEST is empty)"
    return tabulate(rows, tablefmt="plain")


def example_image(cfg) -> str:
    """An image of the first test split for the demo command (the synthetic set's val images are
    in ``images/val/``); ``IMAGE`` when none is at hand."""
    if not cfg.DATASETS.TEST:
        return "IMAGE"
    image_root = getattr(MetadataCatalog.get(cfg.DATASETS.TEST[0]), "image_root", "")
    found = sorted(glob.glob(os.path.join(image_root, "val", "*.png")))
    return found[0] if found else "IMAGE"


def run_summary(
    cfg, config_file: str, results: Optional[Dict], seconds: float, iterations: int
) -> str:
    """What a finished training run prints last."""
    output = cfg.OUTPUT_DIR
    weights = os.path.join(output, "model_final.pth")
    result_files = sorted(glob.glob(os.path.join(output, "inference", "*_results.json")))
    per_iteration = seconds / iterations if iterations else 0.0
    image = example_image(cfg)
    lines = [
        f"Training finished in {_duration(seconds)} ({iterations} iterations, "
        f"{per_iteration:.2f} s per iteration with evaluation and data preparation).",
        metrics_table(results, list(cfg.DATASETS.TEST)),
        f"model:        {weights}",
        f"metrics:      {', '.join(result_files) or os.path.join(output, 'inference')}",
        f"training log: {os.path.join(output, 'metrics.json')}, {os.path.join(output, 'log.txt')}",
        f"TensorBoard:  tensorboard --logdir {output}",
        "Next:",
        f"  score it again: python train_net.py --config-file {config_file} --eval-only "
        f"MODEL.WEIGHTS {weights}",
        f"  ask it:         python demo/demo.py --config-file {config_file} --input {image} "
        f'--text "the red circle" --output demo_out --opts MODEL.WEIGHTS {weights}',
        f"  the demo page:  python demo/app.py --config-file {config_file} "
        f"--opts MODEL.WEIGHTS {weights}   (make demo)",
    ]
    return "\n".join(lines)
