"""GRES evaluation: gRefCOCO (ReLA), Ref-ZOM (DMMI) and RefCOCO-family metrics.

``GRESEvaluator`` is the Detectron2 ``DatasetEvaluator``; :mod:`.metrics` holds the metric
definitions on per-expression records, testable without Detectron2's plumbing.
"""
from .gres_evaluation import GRESEvaluator, predictions_path  # noqa: F401
from .metrics import SampleResult, compute_metrics  # noqa: F401
from .report import summarize_results  # noqa: F401
