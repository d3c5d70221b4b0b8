#!/usr/bin/env python
"""Score a saved prediction dump against a registered dataset, without the model.

A dump is what ``TEST.DUMP_PREDICTIONS True`` makes the evaluator write
(``OUTPUT_DIR/inference/<dataset>_predictions.json``). Ground-truth masks are rebuilt from the
dataset's annotations exactly as the mapper builds them, at the resolution the dump was made at,
and scored with the evaluator's metrics, e.g.::

    python tools/eval_predictions.py --predictions output/inference/grefcoco_unc_val_predictions.json
    python tools/eval_predictions.py --predictions p.json --dataset grefcoco_unc_testA --output-dir out/
"""

import argparse
import logging
import sys
from typing import List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation.testing import print_csv_format
from detectron2.utils.logger import setup_logger


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--predictions", required=True, help="a <dataset>_predictions.json dump")
    parser.add_argument(
        "--dataset", default=None, help="registered dataset name (default: the dump's)"
    )
    parser.add_argument("--output-dir", default=None, help="also write <dataset>_results.json here")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    setup_logger(name="instalign_d2")
    setup_logger(name="detectron2", abbrev_name="d2")
    logger = logging.getLogger("instalign_d2.eval_predictions")

    import instalign_d2  # noqa: F401  (registers the datasets)
    from instalign_d2.evaluation.metrics import EVALUATOR_TYPES
    from instalign_d2.evaluation.prediction_dump import read_dump
    from instalign_d2.evaluation.report import summarize_results
    from instalign_d2.evaluation.rescoring import results_from_dump

    dump = read_dump(args.predictions)
    dataset_name = args.dataset or dump["dataset"]
    if dataset_name != dump["dataset"]:
        logger.warning(f"scoring a dump made on {dump['dataset']!r} against {dataset_name!r}")
    gres_names = sorted(
        n
        for n in DatasetCatalog.list()
        if MetadataCatalog.get(n).get("evaluator_type") in EVALUATOR_TYPES
    )
    if dataset_name not in gres_names:
        raise SystemExit(
            f"{dataset_name!r} is not a registered GRES dataset (metadata evaluator_type in "
            f"{EVALUATOR_TYPES}); registered ones: {gres_names}"
        )
    evaluator_type = MetadataCatalog.get(dataset_name).evaluator_type

    results, skipped = results_from_dump(dump, DatasetCatalog.get(dataset_name))
    metrics = summarize_results(
        dataset_name,
        evaluator_type,
        results,
        skipped,
        output_dir=args.output_dir,
        eval_resolution=dump["eval_resolution"],
        logger=logger,
    )
    print_csv_format(metrics)
    return metrics


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:  # a dump that does not fit the dataset: one clear line, no traceback
        sys.exit(f"eval_predictions: {e}")
