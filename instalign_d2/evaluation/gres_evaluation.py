"""``GRESEvaluator``: gRefCOCO / Ref-ZOM / RefCOCO metrics through Detectron2's evaluator API."""

import itertools
import logging
import os
from collections import OrderedDict
from typing import List, Optional

from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from .metrics import EVALUATOR_TYPES, SampleResult
from .prediction_dump import prediction_record, write_dump
from .report import SkippedSample, summarize_results
from .scoring import check_eval_resolution, sample_ids, score_sample


def predictions_path(output_dir: str, dataset_name: str) -> str:
    return os.path.join(output_dir, f"{dataset_name}_predictions.json")


class GRESEvaluator(DatasetEvaluator):
    """Scores merged-mask predictions of referring expressions, one record of I, U and flags each.

    The metric family comes from ``MetadataCatalog.get(dataset_name).evaluator_type``
    (``"grefcoco"``, ``"refzom"`` or ``"refcoco"``); definitions in :mod:`.metrics`. Masks are
    never kept -- only per-sample counts, and RLE predictions when ``dump_predictions`` is set.

    ``evaluate()`` returns ``{"grefcoco": {"cIoU": ..., ...}}`` (the family's name; with
    ``_original`` appended when scoring at the original resolution).

    Build it from a config with ``GRESEvaluator(cfg, dataset_name, output_dir=...)`` or from
    plain arguments.
    """

    @configurable
    def __init__(
        self,
        dataset_name: str,
        distributed: bool = True,
        output_dir: Optional[str] = None,
        eval_resolution: str = "input",
        dump_predictions: bool = False,
        mask_threshold: float = 0.5,
        no_target_threshold: float = 0.5,
    ):
        """
        Args:
            dataset_name: a registered dataset whose metadata has ``evaluator_type``.
            distributed: gather the records of all processes before scoring.
            output_dir: where ``<dataset>_results.json`` (and the dump) go; None writes nothing.
            eval_resolution: ``"input"`` compares at the mapper's resolution (ReLA / DMMI);
                ``"original"`` at the original image size.
            dump_predictions: also write ``<dataset>_predictions.json`` (RLE) to ``output_dir``.
            mask_threshold: ``ref_seg(_input)`` above it is foreground.
            no_target_threshold: ``nt_prob`` above it means no target (empty prediction).
        """
        self._logger = logging.getLogger(__name__)
        self._dataset_name = dataset_name
        self._distributed = distributed
        self._output_dir = output_dir
        self._eval_resolution = check_eval_resolution(eval_resolution)
        self._mask_threshold = float(mask_threshold)
        self._no_target_threshold = float(no_target_threshold)
        if dump_predictions and not output_dir:
            raise ValueError(
                "GRESEvaluator: dump_predictions needs an output_dir to write the dump to"
            )
        self._dump_predictions = dump_predictions
        self._evaluator_type = self._metric_family(dataset_name)
        self.reset()

    @classmethod
    def from_config(
        cls, cfg, dataset_name: str, output_dir: Optional[str] = None, distributed: bool = True
    ):
        return {
            "dataset_name": dataset_name,
            "distributed": distributed,
            "output_dir": (
                output_dir if output_dir is not None else os.path.join(cfg.OUTPUT_DIR, "inference")
            ),
            "eval_resolution": cfg.TEST.EVAL_RESOLUTION,
            "dump_predictions": cfg.TEST.DUMP_PREDICTIONS,
            # the model's own thresholds, so the evaluator binarises exactly as the model does
            "mask_threshold": cfg.MODEL.INSTALIGN.TEST.MASK_THRESHOLD,
            "no_target_threshold": cfg.MODEL.INSTALIGN.TEST.NO_TARGET_THRESHOLD,
        }

    @staticmethod
    def _metric_family(dataset_name: str) -> str:
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type")
        if evaluator_type not in EVALUATOR_TYPES:
            raise ValueError(
                f"dataset {dataset_name!r} has evaluator_type {evaluator_type!r} in its metadata; "
                f"GRESEvaluator needs one of {EVALUATOR_TYPES} (is the dataset registered? "
                "importing instalign_d2 registers ours)"
            )
        return evaluator_type

    @property
    def evaluator_type(self) -> str:
        return self._evaluator_type

    def reset(self):
        self._results: List[SampleResult] = []
        self._skipped: List[SkippedSample] = []
        self._predictions: List[dict] = []

    def process(self, inputs, outputs):
        if len(inputs) != len(outputs):
            raise ValueError(
                f"GRESEvaluator.process: {len(inputs)} inputs but {len(outputs)} outputs"
            )
        for sample, output in zip(inputs, outputs):
            if sample.get("skipped_reason"):  # the mapper could not read it: counted, not scored
                image_id, sent_id = sample_ids(sample)
                self._skipped.append((image_id, sent_id, str(sample["skipped_reason"])))
                continue
            result, pred_mask, nt_prob = score_sample(
                sample,
                output,
                self._eval_resolution,
                self._mask_threshold,
                self._no_target_threshold,
            )
            self._results.append(result)
            if self._dump_predictions:
                self._predictions.append(
                    prediction_record(
                        result.image_id, result.sent_id, pred_mask, nt_prob, result.pred_no_target
                    )
                )

    def evaluate(self):
        results, skipped, predictions = self._results, self._skipped, self._predictions
        if self._distributed and comm.get_world_size() > 1:
            comm.synchronize()
            gathered = comm.gather((results, skipped, predictions), dst=0)
            if not comm.is_main_process():
                return {}
            results = list(itertools.chain.from_iterable(g[0] for g in gathered))
            skipped = list(itertools.chain.from_iterable(g[1] for g in gathered))
            predictions = list(itertools.chain.from_iterable(g[2] for g in gathered))

        if self._dump_predictions:
            self._write_dump(predictions, skipped)
        return summarize_results(
            self._dataset_name,
            self._evaluator_type,
            results,
            skipped,
            output_dir=self._output_dir,
            eval_resolution=self._eval_resolution,
            logger=self._logger,
        )

    def _write_dump(self, predictions: List[dict], skipped: List[SkippedSample]) -> None:
        # one record per expression, in a fixed order whatever the number of processes
        unique = OrderedDict()
        for p in sorted(predictions, key=lambda p: (str(p["image_id"]), str(p["sent_id"]))):
            unique.setdefault((p["image_id"], p["sent_id"]), p)
        path = write_dump(
            predictions_path(self._output_dir, self._dataset_name),
            self._dataset_name,
            self._eval_resolution,
            self._mask_threshold,
            self._no_target_threshold,
            list(unique.values()),
            sorted(set(skipped), key=lambda s: (str(s[0]), str(s[1]))),
        )
        self._logger.info(f"Wrote {len(unique)} RLE predictions to {path}")
