"""GRES evaluation: gRefCOCO (ReLA), Ref-ZOM (DMMI) and RefCOCO-family metrics.

``GRESEvaluator`` is the Detectron2 ``DatasetEvaluator``; :mod:`.metrics` holds the metric
definitions on per-expression records, testable without Detectron2's plumbing.
"""

from .gres_evaluation import GRESEvaluator, predictions_path
from .metrics import SampleResult, compute_metrics
from .report import summarize_results

__all__ = [
    "GRESEvaluator",
    "SampleResult",
    "compute_metrics",
    "predictions_path",
    "summarize_results",
]
