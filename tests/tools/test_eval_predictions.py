"""tools/eval_predictions.py: a dump scored without the model gives the evaluator's numbers."""

import json
import uuid

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog

from instalign_d2.data.masks import merged_mask
from instalign_d2.evaluation.gres_evaluation import GRESEvaluator, predictions_path
from instalign_d2.evaluation.prediction_dump import read_dump
from instalign_d2.evaluation.rescoring import results_from_dump

H, W, S = 10, 14, 8


def rect(x0, y0, x1, y1):
    """A COCO polygon annotation of an axis-aligned rectangle."""
    return {
        "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "category_id": 1,
    }


def dataset_dicts():
    specs = [  # (annotations, kind, refzom kind)
        ([rect(1, 1, 6, 5)], "single", "one_to_one"),
        ([rect(0, 0, 4, 4), rect(8, 5, 13, 9)], "multi", "one_to_many"),
        ([], "no_target", "one_to_zero"),
        ([], "no_target", "one_to_zero"),
        ([rect(2, 6, 12, 9)], "single", "one_to_one"),
    ]
    return [
        {
            "file_name": f"img{n // 2}.jpg",
            "height": H,
            "width": W,
            "image_id": n // 2,
            "annotations": annotations,
            "sentence": {"raw": "", "sent_id": 100 + n, "ref_id": n},
            "empty": not annotations,
            "expression_kind": kind,
            "refzom_kind": zkind,
        }
        for n, (annotations, kind, zkind) in enumerate(specs)
    ]


def register(evaluator_type):
    name = f"test_rescore_{evaluator_type}_{uuid.uuid4().hex[:8]}"
    dicts = dataset_dicts()
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(evaluator_type=evaluator_type)
    return name, dicts


def model_run(dicts, resolution, seed=0):
    """Mapper-like inputs (GT from the shared mask function) and random model-like outputs."""
    rng = np.random.default_rng(seed)
    pairs = []
    for n, d in enumerate(dicts):
        inp = {k: d[k] for k in ("image_id", "sentence", "empty", "expression_kind", "refzom_kind")}
        inp["gt_mask_merged"] = torch.from_numpy(merged_mask(d["annotations"], H, W, out_size=S))
        inp["gt_mask_merged_original"] = torch.from_numpy(merged_mask(d["annotations"], H, W))
        out = {
            "ref_seg_input": torch.from_numpy(rng.random((S, S))).float(),
            "ref_seg": torch.from_numpy(rng.random((H, W))).float(),
            "nt_prob": torch.tensor(0.9 if n == 2 else 0.1),
        }
        if n == 4:
            inp["skipped_reason"] = "missing image"
        pairs.append((inp, out))
    return pairs


@pytest.mark.parametrize(
    "evaluator_type, resolution", [("grefcoco", "input"), ("refzom", "original")]
)
def test_dump_rescored_equals_evaluator(tmp_path, evaluator_type, resolution, load_tool):
    name, dicts = register(evaluator_type)
    evaluator = GRESEvaluator(
        name, output_dir=str(tmp_path / "eval"), eval_resolution=resolution, dump_predictions=True
    )
    evaluator.reset()
    for inp, out in model_run(dicts, resolution):
        evaluator.process([inp], [out])
    expected = evaluator.evaluate()
    task = evaluator_type if resolution == "input" else f"{evaluator_type}_original"
    assert list(expected) == [task]  # original-resolution numbers are named so
    assert expected[task]["num_expressions"] == 4 and expected[task]["num_skipped"] == 1

    dump_file = predictions_path(str(tmp_path / "eval"), name)
    results, skipped = results_from_dump(read_dump(dump_file), dicts)
    assert [r.sent_id for r in results] == [100, 101, 102, 103] and [s[1] for s in skipped] == [104]
    got = load_tool("eval_predictions").main(
        ["--predictions", dump_file, "--output-dir", str(tmp_path / "tool")]
    )
    assert got == expected  # exactly the same numbers, through the same metric code
    saved = json.load(open(tmp_path / "tool" / f"{name}_results.json"))
    assert saved["eval_resolution"] == resolution


def test_dump_of_another_dataset_is_refused(tmp_path):
    name, dicts = register("grefcoco")
    evaluator = GRESEvaluator(name, output_dir=str(tmp_path), dump_predictions=True)
    evaluator.reset()
    for inp, out in model_run(dicts, "input")[:2]:  # a dump that covers only part of the dataset
        evaluator.process([inp], [out])
    evaluator.evaluate()
    dump = read_dump(predictions_path(str(tmp_path), name))
    with pytest.raises(ValueError, match=r"3 expressions have no prediction.*\(1, 102\)"):
        results_from_dump(dump, dicts)
    with pytest.raises(ValueError, match="not an instalign_d2 prediction dump"):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"predictions": []}))
        read_dump(str(bad))
