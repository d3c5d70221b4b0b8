"""Two gloo processes give exactly the numbers (and dump) of one process."""

import json
import os

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.engine import launch
from detectron2.utils import comm

from instalign_d2.engine import finish_distributed
from instalign_d2.evaluation.gres_evaluation import GRESEvaluator, predictions_path

SIZE = 12
KINDS = ("single", "multi", "no_target")


def make_samples(seed=0, count=41):
    """Random expressions (mapper-like inputs, model-like outputs) incl. no-target and a skipped one."""
    rng = np.random.default_rng(seed)
    samples = []
    for n in range(count):
        kind = KINDS[n % 3]
        gt = (
            torch.from_numpy(rng.random((SIZE, SIZE)) < 0.3)
            if kind != "no_target"
            else torch.zeros(SIZE, SIZE, dtype=torch.bool)
        )
        inp = {
            "image_id": int(n // 4),
            "sentence": {"raw": "", "sent_id": n, "ref_id": n},
            "empty": kind == "no_target",
            "gt_mask_merged": gt,
            "expression_kind": kind,
        }
        if n == 17:
            inp["skipped_reason"] = "unreadable image"
        out = {
            "ref_seg_input": torch.from_numpy(rng.random((SIZE, SIZE))).float(),
            "nt_prob": torch.tensor(float(rng.random())),
        }
        samples.append((inp, out))
    return samples


def evaluate_shards(jobs):
    """Worker: one evaluation per (dataset_name, evaluator_type, output_dir, result_file) job."""
    for job in jobs:
        evaluate_shard(*job)
    finish_distributed()


def evaluate_shard(dataset_name, evaluator_type, output_dir, result_file):
    """Rank r scores every world_size-th sample (rank 1 also a padded repeat); rank 0 saves the results."""
    MetadataCatalog.get(dataset_name).set(evaluator_type=evaluator_type)
    rank, world = comm.get_rank(), comm.get_world_size()
    samples = make_samples()
    mine = samples[rank::world]
    if rank == 1:
        mine = mine + samples[:1]  # a sampler that pads its last batch
    evaluator = GRESEvaluator(dataset_name, output_dir=output_dir, dump_predictions=True)
    evaluator.reset()
    for i in range(0, len(mine), 3):  # batches of 3, as a test loader might give them
        batch = mine[i : i + 3]
        evaluator.process([b[0] for b in batch], [b[1] for b in batch])
    results = evaluator.evaluate()
    if comm.is_main_process():
        with open(result_file, "w") as f:
            json.dump(results, f)
    else:
        assert results == {}


def test_two_processes_equal_one(tmp_path):
    families = ("grefcoco", "refzom")

    def job(evaluator_type, processes):
        return (
            f"test_eval_dist_{evaluator_type}",
            evaluator_type,
            str(tmp_path / f"{evaluator_type}_{processes}"),
            str(tmp_path / f"{evaluator_type}_{processes}.json"),
        )

    evaluate_shards([job(t, 1) for t in families])
    # one launch for both families: starting gloo workers is the slow part
    launch(evaluate_shards, 2, dist_url="auto", args=([job(t, 2) for t in families],))
    for evaluator_type in families:
        name = f"test_eval_dist_{evaluator_type}"
        one, two = tmp_path / f"{evaluator_type}_1", tmp_path / f"{evaluator_type}_2"
        single = json.load(open(tmp_path / f"{evaluator_type}_1.json"))
        double = json.load(open(tmp_path / f"{evaluator_type}_2.json"))
        assert single == double  # exact, not approximate
        assert (
            single[evaluator_type]["num_expressions"] == 40
            and single[evaluator_type]["num_skipped"] == 1
        )
        assert 0 < single[evaluator_type]["oIoU" if evaluator_type == "refzom" else "cIoU"] < 100
        dump_1 = json.load(open(predictions_path(str(one), name)))
        dump_2 = json.load(open(predictions_path(str(two), name)))
        assert dump_1 == dump_2 and len(dump_1["predictions"]) == 40
        assert sorted(os.listdir(one)) == sorted(os.listdir(two))
