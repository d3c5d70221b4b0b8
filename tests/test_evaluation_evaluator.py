"""GRESEvaluator through Detectron2's API: mapper-like inputs, model-like outputs, files, errors."""

import json
import logging
import os
import uuid

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.evaluation.testing import flatten_results_dict, print_csv_format

from instalign_d2.config import add_instalign_config
from instalign_d2.evaluation.gres_evaluation import GRESEvaluator, predictions_path
from instalign_d2.evaluation.prediction_dump import decode_mask, read_dump
from instalign_d2.evaluation.report import per_sample_path, results_path
from instalign_d2.evaluation.scoring import SampleError

S = 8  # the "mapper resolution" of these tests


def register(evaluator_type):
    """A throw-away dataset name carrying only the metadata the evaluator reads."""
    name = f"test_eval_{evaluator_type}_{uuid.uuid4().hex[:8]}"
    MetadataCatalog.get(name).set(evaluator_type=evaluator_type)
    return name


def box(y0, y1, x0, x1, size=S):
    m = torch.zeros(size, size, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def make_input(sent_id, gt, empty=None, image_id=1, **extra):
    empty = (not bool(gt.any())) if empty is None else empty
    d = {
        "image_id": image_id,
        "sentence": {"raw": "x", "sent_id": sent_id, "ref_id": sent_id},
        "empty": empty,
        "gt_mask_merged": gt,
        "height": 2 * S,
        "width": 2 * S,
    }
    d.update(extra)
    return d


def make_output(pred, nt_prob=0.1, original=None):
    prob = pred.float() * 0.9  # a probability map whose > 0.5 region is ``pred``
    return {
        "ref_seg_input": prob,
        "ref_seg": original if original is not None else torch.zeros(2 * S, 2 * S),
        "nt_prob": torch.tensor(nt_prob),
    }


def run(evaluator, pairs):
    evaluator.reset()
    for inp, out in pairs:
        evaluator.process([inp], [out])
    return evaluator.evaluate()


def test_grefcoco_end_to_end(tmp_path):
    name = register("grefcoco")
    ev = GRESEvaluator(name, output_dir=str(tmp_path))
    pairs = [
        # 4x4 target, 4x2 of it predicted: I = 8, U = 16
        (make_input(1, box(0, 4, 0, 4), expression_kind="single"), make_output(box(0, 4, 0, 2))),
        # two objects, exact: I = U = 8
        (
            make_input(2, box(0, 2, 0, 2) | box(4, 6, 4, 6), expression_kind="multi"),
            make_output(box(0, 2, 0, 2) | box(4, 6, 4, 6)),
        ),
        # no-target caught although the mask has pixels: the prediction is emptied
        (
            make_input(3, box(0, 0, 0, 0), expression_kind="no_target"),
            make_output(box(0, 8, 0, 8), nt_prob=0.9),
        ),
        # no-target missed with 3 predicted pixels
        (make_input(4, box(0, 0, 0, 0), expression_kind="no_target"), make_output(box(7, 8, 0, 3))),
    ]
    results = run(ev, pairs)
    m = results["grefcoco"]
    assert m["cIoU"] == pytest.approx(100 * (8 + 8) / (16 + 8 + 3))
    assert m["gIoU"] == pytest.approx(100 * (0.5 + 1 + 1 + 0) / 4)
    assert m["N_acc"] == pytest.approx(50.0) and m["T_acc"] == pytest.approx(100.0)
    assert m["Pr@0.7"] == pytest.approx(50.0)
    assert m["gIoU_single"] == pytest.approx(50.0) and m["cIoU_multi"] == pytest.approx(100.0)
    assert m["num_expressions"] == 4 and m["num_skipped"] == 0
    # what Detectron2 does with the dict: print it, and store every value as a float
    print_csv_format(results)
    assert all(isinstance(float(v), float) for v in flatten_results_dict(results).values())
    assert not [k for k in m if "-" in k]  # print_csv_format hides names with '-'
    # the JSON file holds the same numbers, and no temp file is left behind
    saved = json.load(open(results_path(str(tmp_path), name)))
    assert saved["results"]["grefcoco"] == pytest.approx(m)
    assert saved["counts"]["by_kind"] == {"single": 1, "multi": 1, "no_target": 2}
    per_sample = json.load(open(per_sample_path(str(tmp_path), name)))
    assert [(r["sent_id"], r["intersection"], r["union"]) for r in per_sample] == [
        (1, 8, 16),
        (2, 8, 8),
        (3, 0, 0),
        (4, 0, 3),
    ]
    assert sorted(os.listdir(tmp_path)) == sorted(
        [f"{name}_results.json", f"{name}_per_sample.json"]
    )


def test_grefcoco_per_template_table_and_json(tmp_path, caplog):
    name = register("grefcoco")
    ev = GRESEvaluator(name, output_dir=str(tmp_path))
    spatial, attribute, none = (
        {"expression_template": t, "expression_kind": k}
        for t, k in (("spatial", "single"), ("attribute", "single"), ("no_target", "no_target"))
    )
    pairs = [
        (make_input(1, box(0, 4, 0, 4), **spatial), make_output(box(0, 4, 0, 2))),  # IoU 1/2
        (make_input(2, box(0, 2, 0, 2), **spatial), make_output(box(4, 6, 4, 6))),  # IoU 0
        (make_input(3, box(0, 2, 0, 4), **attribute), make_output(box(0, 2, 0, 4))),  # IoU 1
        (make_input(4, box(0, 0, 0, 0), **none), make_output(box(0, 8, 0, 8), nt_prob=0.9)),
        (make_input(5, box(0, 0, 0, 0), **none), make_output(box(7, 8, 0, 3))),  # missed
    ]
    with caplog.at_level("INFO"):
        m = run(ev, pairs)["grefcoco"]
    assert m["gIoU_template_spatial"] == pytest.approx(25.0)
    assert m["cIoU_template_spatial"] == pytest.approx(100 * 8 / (16 + 8))
    assert m["T_acc_template_spatial"] == pytest.approx(100.0)
    assert m["gIoU_template_attribute"] == pytest.approx(100.0)
    assert m["N_acc_template_no_target"] == pytest.approx(50.0)
    assert "T_acc_template_no_target" not in m and "N_acc_template_spatial" not in m
    saved = json.load(open(results_path(str(tmp_path), name)))
    assert saved["counts"]["by_template"] == {"attribute": 1, "no_target": 2, "spatial": 2}
    table = caplog.text[caplog.text.index("By expression template") :]
    spatial_row = next(line for line in table.splitlines() if line.startswith("| spatial"))
    assert [cell.strip() for cell in spatial_row.strip("|").split("|")] == [
        "spatial",
        "2",
        "25.00",
        "33.33",
        "-",
        "100.00",
    ]


def test_thresholds_are_strict():
    name = register("grefcoco")
    gt = box(0, 2, 0, 2)
    half = {
        "ref_seg_input": gt.float() * 0.5,
        "nt_prob": torch.tensor(0.5),
    }  # exactly 0.5: neither fires
    m = run(GRESEvaluator(name), [(make_input(1, gt), half)])["grefcoco"]
    assert m["cIoU"] == 0.0 and m["T_acc"] == 100.0
    lower = GRESEvaluator(name, mask_threshold=0.4, no_target_threshold=0.6)
    assert run(lower, [(make_input(1, gt), half)])["grefcoco"]["cIoU"] == 100.0


def test_refzom_end_to_end_with_table(caplog):
    name = register("refzom")
    pairs = [
        (make_input(1, box(0, 4, 0, 4), refzom_kind="one_to_one"), make_output(box(0, 4, 0, 4))),
        (
            make_input(2, box(0, 4, 0, 2) | box(0, 4, 4, 6), refzom_kind="one_to_many"),
            make_output(box(0, 4, 0, 2)),
        ),
        (
            make_input(3, box(0, 0, 0, 0), refzom_kind="one_to_zero"),
            make_output(box(5, 6, 5, 6)),
        ),  # one stray pixel
        (
            make_input(4, box(0, 0, 0, 0), refzom_kind="one_to_zero"),
            make_output(box(0, 8, 0, 8), nt_prob=0.7),
        ),
    ]
    with caplog.at_level(logging.INFO):
        m = run(GRESEvaluator(name), pairs)["refzom"]
    assert m["oIoU"] == pytest.approx(100 * (16 + 8) / (16 + 16))
    assert m["mIoU"] == pytest.approx(100 * (1 + 0.5) / 2)
    assert m["Acc"] == pytest.approx(50.0)
    assert m["oIoU_one_to_one"] == pytest.approx(100.0) and m["mIoU_one_to_many"] == pytest.approx(
        50.0
    )
    assert "one-to-zero Acc" in caplog.text and "one-to-many mIoU" in caplog.text


def test_refcoco_family():
    name = register("refcoco")
    pairs = [
        (make_input(1, box(0, 4, 0, 4)), make_output(box(0, 4, 0, 2))),
        (make_input(2, box(0, 2, 0, 2)), make_output(box(0, 2, 0, 2))),
    ]
    m = run(GRESEvaluator(name), pairs)["refcoco"]
    assert m["oIoU"] == pytest.approx(100 * 12 / 20) and m["mIoU"] == pytest.approx(75.0)
    assert m["Pr@0.5"] == 100.0 and m["Pr@0.6"] == 50.0


def test_original_resolution_uses_original_masks():
    name = register("grefcoco")
    gt_original = box(0, 8, 0, 8, size=2 * S)
    inp = make_input(1, box(0, 1, 0, 1), gt_mask_merged_original=gt_original)
    # the input-resolution mask would score 0; the original-resolution one scores 32/64
    out = make_output(box(4, 8, 4, 8), original=box(0, 4, 0, 8, size=2 * S).float())
    assert run(GRESEvaluator(name, eval_resolution="original"), [(inp, out)])["grefcoco_original"][
        "cIoU"
    ] == pytest.approx(50.0)
    assert run(GRESEvaluator(name), [(inp, out)])["grefcoco"]["cIoU"] == 0.0
    with pytest.raises(SampleError, match="gt_mask_merged_original.*EVAL_RESOLUTION"):
        run(
            GRESEvaluator(name, eval_resolution="original"), [(make_input(1, box(0, 1, 0, 1)), out)]
        )
    with pytest.raises(ValueError, match="TEST.EVAL_RESOLUTION"):
        GRESEvaluator(name, eval_resolution="480")


def test_built_from_config(tmp_path):
    name = register("grefcoco")
    cfg = add_instalign_config(get_cfg())
    cfg.OUTPUT_DIR = str(tmp_path)
    cfg.TEST.EVAL_RESOLUTION = "original"
    cfg.TEST.DUMP_PREDICTIONS = True
    cfg.MODEL.INSTALIGN.TEST.NO_TARGET_THRESHOLD = 0.3
    ev = GRESEvaluator(cfg, name)
    inp = make_input(1, box(0, 0, 0, 0), gt_mask_merged_original=box(0, 0, 0, 0, size=2 * S))
    m = run(ev, [(inp, make_output(box(0, 1, 0, 1), nt_prob=0.4))])["grefcoco_original"]
    assert m["N_acc"] == 100.0  # 0.4 > the configured 0.3
    assert os.path.exists(predictions_path(os.path.join(str(tmp_path), "inference"), name))


def test_skipped_samples_are_counted_not_scored():
    name = register("grefcoco")
    broken = make_input(9, box(0, 8, 0, 8), skipped_reason="missing image a.jpg")
    pairs = [
        (make_input(1, box(0, 2, 0, 2)), make_output(box(0, 2, 0, 2))),
        (broken, {}),
    ]  # outputs not even checked
    m = run(GRESEvaluator(name), pairs)["grefcoco"]
    assert m["num_skipped"] == 1 and m["num_expressions"] == 1 and m["cIoU"] == 100.0


def test_empty_evaluation_says_so(tmp_path):
    name = register("grefcoco")
    results = run(GRESEvaluator(name, output_dir=str(tmp_path)), [])
    assert results == {"grefcoco": {"num_expressions": 0, "num_skipped": 0}}
    assert json.load(open(results_path(str(tmp_path), name)))["counts"]["num_expressions"] == 0
    print_csv_format(results)


def test_repeated_expression_counted_once():
    name = register("grefcoco")
    pair = (make_input(1, box(0, 4, 0, 4)), make_output(box(0, 4, 0, 2)))
    other = (make_input(2, box(0, 2, 0, 2)), make_output(box(0, 2, 0, 2)))
    m = run(GRESEvaluator(name), [pair, other, pair])["grefcoco"]
    assert m["num_expressions"] == 2 and m["cIoU"] == pytest.approx(100 * 12 / 20)


@pytest.mark.parametrize(
    "output, message",
    [
        ({"ref_seg_input": torch.zeros(S, S)}, "no 'nt_prob'"),
        ({"nt_prob": torch.tensor(0.1)}, "no 'ref_seg_input'"),
        ({"ref_seg_input": torch.zeros(S, S + 1), "nt_prob": torch.tensor(0.1)}, r"shape \(8, 9\)"),
        ({"ref_seg_input": torch.zeros(S, S), "nt_prob": torch.tensor(float("nan"))}, "nan"),
        ({"ref_seg_input": torch.full((S, S), float("nan")), "nt_prob": torch.tensor(0.1)}, "NaN"),
        ({"ref_seg_input": torch.zeros(S, S), "nt_prob": torch.zeros(2)}, "one probability"),
    ],
)
def test_bad_outputs_name_the_sample(output, message):
    ev = GRESEvaluator(register("grefcoco"))
    with pytest.raises(SampleError, match=message) as err:
        ev.process([make_input(42, box(0, 1, 0, 1), image_id=1234)], [output])
    assert "image_id=1234" in str(err.value) and "sent_id=42" in str(err.value)


def test_bad_setup_errors():
    with pytest.raises(ValueError, match="evaluator_type"):
        GRESEvaluator(f"never_registered_{uuid.uuid4().hex[:6]}")
    with pytest.raises(ValueError, match="output_dir"):
        GRESEvaluator(register("grefcoco"), dump_predictions=True)
    ev = GRESEvaluator(register("grefcoco"))
    with pytest.raises(ValueError, match="sent_id"):
        ev.process(
            [{"image_id": 5, "gt_mask_merged": box(0, 1, 0, 1), "empty": False}],
            [make_output(box(0, 1, 0, 1))],
        )
    with pytest.raises(ValueError, match="2 inputs but 1 outputs"):
        ev.process([make_input(1, box(0, 1, 0, 1))] * 2, [make_output(box(0, 1, 0, 1))])


def test_prediction_dump_round_trip(tmp_path):
    name = register("grefcoco")
    pred = box(1, 3, 2, 7)
    pairs = [
        (make_input(2, box(0, 4, 0, 4)), make_output(pred)),
        (make_input(1, box(0, 0, 0, 0)), make_output(box(0, 8, 0, 8), nt_prob=0.95)),
    ]
    run(GRESEvaluator(name, output_dir=str(tmp_path), dump_predictions=True), pairs)
    dump = read_dump(predictions_path(str(tmp_path), name))
    assert dump["dataset"] == name and dump["eval_resolution"] == "input"
    by_id = {p["sent_id"]: p for p in dump["predictions"]}
    assert np.array_equal(decode_mask(by_id[2]["segmentation"]), pred.numpy())
    assert not decode_mask(
        by_id[1]["segmentation"]
    ).any()  # a no-target prediction is the empty mask
    assert by_id[1]["pred_no_target"] and by_id[1]["nt_prob"] == pytest.approx(0.95)
    assert [p["sent_id"] for p in dump["predictions"]] == [
        1,
        2,
    ]  # sorted, whatever the process order
