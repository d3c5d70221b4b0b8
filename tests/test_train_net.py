"""train_net.py end to end on a tiny synthetic dataset: bad input stops at once with one line,
a short training run writes checkpoints and metrics, --eval-only scores the checkpoint, and
grouping the expressions of each image gives the same metrics as one expression at a time."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

import train_net

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "synthetic", "instalign_tiny.yaml")

# A very small version of the tiny config: few images, a small input, a handful of iterations.
TINY = [
    "DATASETS.SYNTHETIC.NUM_TRAIN_IMAGES",
    "12",
    "DATASETS.SYNTHETIC.NUM_VAL_IMAGES",
    "4",
    "DATASETS.SYNTHETIC.NUM_TEST_IMAGES",
    "4",
    "DATASETS.SYNTHETIC.IMAGE_SIZE",
    "64",
    "INPUT.IMAGE_SIZE",
    "64",
    "MODEL.TIMM.NAME",
    "test_resnet",
    "MODEL.TIMM.SYNTHETIC_PRETRAIN.ITERATIONS",
    "2",
    "MODEL.TIMM.SYNTHETIC_PRETRAIN.IMS_PER_BATCH",
    "2",
    "DATALOADER.NUM_WORKERS",
    "0",
    "SOLVER.IMS_PER_BATCH",
    "2",
    "TEST.EVAL_PERIOD",
    "0",
]


@pytest.fixture
def datasets_root(tmp_path, monkeypatch):
    root = tmp_path / "datasets"
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    return root


def run(argv, capsys):
    rc = train_net.invoke_main(argv)
    captured = capsys.readouterr()
    return rc, captured.err


def test_first_run_shows_the_dataset_generation_on_the_console(datasets_root, capsys):
    cfg = train_net.build_config(
        train_net.default_argument_parser().parse_args(["--config-file", CONFIG, *TINY])
    )
    train_net.prepare_data(cfg)
    out = capsys.readouterr().out
    assert (
        "synthetic GRES: drawing 20 images" in out
    )  # 12 + 4 + 4, before any Detectron2 logger exists
    assert (datasets_root / "synthetic_gres" / "generator.json").is_file()
    train_net.prepare_data(cfg)  # a second run finds it complete
    assert "is up to date" in capsys.readouterr().out


def test_a_dataset_made_with_other_parameters_stops_the_run_and_stays(
    tmp_path, datasets_root, capsys
):
    argv = ["--config-file", CONFIG, *TINY, "OUTPUT_DIR", str(tmp_path / "out")]
    train_net.prepare_data(
        train_net.build_config(train_net.default_argument_parser().parse_args(argv))
    )
    refs = (datasets_root / "synthetic_gres" / "grefs(unc).json").read_bytes()
    capsys.readouterr()
    rc, err = run(argv + ["DATASETS.SYNTHETIC.SEED", "4242"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "synthetic_gres was generated with other parameters: seed 0 (asked: 4242)" in err
    assert (datasets_root / "synthetic_gres" / "grefs(unc).json").read_bytes() == refs
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "extra, expected",
    [
        (
            ["DATASETS.TRAIN", "('grefcoco_unc_trian',)"],
            "DATASETS.TRAIN: unknown dataset 'grefcoco_unc_trian'",
        ),
        (["DATASETS.TEST", "('nope_val',)"], "DATASETS.TEST: unknown dataset 'nope_val'"),
        (["MODEL.WEIGHTS", "/no/such/model.pth"], "MODEL.WEIGHTS=/no/such/model.pth: no such file"),
        (
            ["MODEL.WEIGHTS", "detectron2://ImageNetPretrained/MSRA/R-50.pkl"],
            "remote weights cannot be fetched",
        ),
        (
            [
                "MODEL.TIMM.PRETRAINED_WEIGHTS",
                "/no/swin.pth",
                "MODEL.TIMM.SYNTHETIC_PRETRAIN.ITERATIONS",
                "0",
            ],
            "MODEL.TIMM.PRETRAINED_WEIGHTS=/no/swin.pth: no such file",
        ),
        (["SOLVER.AMP.ENABLED", "True"], "SOLVER.AMP.ENABLED=True needs a CUDA GPU"),
        (
            [
                "INPUT.EARLY_TRAIN_SIZE",
                "32",
                "INPUT.EARLY_TRAIN_FRACTION",
                "0.5",
                "DATALOADER.NUM_WORKERS",
                "2",
            ],
            "set DATALOADER.NUM_WORKERS 0",
        ),
    ],
)
def test_bad_config_values_stop_with_one_line_and_write_nothing(
    extra, expected, tmp_path, datasets_root, capsys
):
    if "AMP" in extra[0] and torch.cuda.is_available():
        pytest.skip("AMP works on a GPU machine")
    output = tmp_path / "out"
    rc, err = run(["--config-file", CONFIG, *TINY, "OUTPUT_DIR", str(output), *extra], capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("instalign_d2: error: ")
    assert expected in lines[0]
    assert not output.exists()
    assert not datasets_root.exists()  # nothing generated either: checks come first


def test_unknown_key_and_malformed_options_stop_with_one_line(tmp_path, capsys):
    rc, err = run(
        [
            "--config-file",
            CONFIG,
            "MODEL.INSTALIGN.NUM_QUERIES",
            "5",
            "OUTPUT_DIR",
            str(tmp_path / "o"),
        ],
        capsys,
    )
    assert rc == 2 and "MODEL.INSTALIGN.NUM_QUERIES" in err and len(err.strip().splitlines()) == 1
    rc, err = run(["--config-file", CONFIG, "SOLVER.MAX_ITER"], capsys)
    assert rc == 2 and "KEY VALUE pairs" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_missing_config_file_and_missing_eval_weights(tmp_path, capsys):
    rc, err = run(["--config-file", str(tmp_path / "nope.yaml")], capsys)
    assert rc == 2 and f"--config-file {tmp_path / 'nope.yaml'}: no such file" in err
    rc, err = run(
        ["--config-file", CONFIG, "--eval-only", "OUTPUT_DIR", str(tmp_path / "o")], capsys
    )
    assert rc == 2 and "--eval-only needs a checkpoint: add MODEL.WEIGHTS" in err
    assert not (tmp_path / "o").exists()


def test_missing_text_encoder_directory_names_the_key(tmp_path, datasets_root, capsys):
    rc, err = run(
        [
            "--config-file",
            os.path.join(REPO, "configs", "grefcoco", "instalign_swin_base.yaml"),
            "DATASETS.TRAIN",
            "('synthetic_gres_train',)",
            "DATASETS.TEST",
            "('synthetic_gres_val',)",
            "MODEL.TIMM.PRETRAINED_WEIGHTS",
            "",
            "MODEL.TEXT_ENCODER.NAME",
            str(tmp_path / "roberta-base"),
            "OUTPUT_DIR",
            str(tmp_path / "o"),
        ],
        capsys,
    )
    assert rc == 2 and f"MODEL.TEXT_ENCODER.NAME='{tmp_path / 'roberta-base'}'" in err


def _metrics_rows(output):
    with open(output / "metrics.json") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_short_training_then_eval_only_and_grouped_equals_ungrouped(
    tmp_path, datasets_root, capsys
):
    output = tmp_path / "train"
    rc = train_net.invoke_main(
        [
            "--config-file",
            CONFIG,
            *TINY,
            "SOLVER.MAX_ITER",
            "4",
            "SOLVER.CHECKPOINT_PERIOD",
            "2",
            # coarse-to-fine: 32 x 32 inputs for the first half, then INPUT.IMAGE_SIZE (64)
            "INPUT.EARLY_TRAIN_SIZE",
            "32",
            "INPUT.EARLY_TRAIN_FRACTION",
            "0.5",
            "OUTPUT_DIR",
            str(output),
        ],
    )
    captured = capsys.readouterr()
    err = captured.err
    assert rc == 0, err
    # The run ends with its summary: metrics, time, where the files are, what to try next.
    summary = captured.out[captured.out.index("Training finished in") :]
    assert "(4 iterations," in summary and "synthetic_gres_val" in summary and "gIoU" in summary
    assert f"model:        {output / 'model_final.pth'}" in summary
    assert "--eval-only MODEL.WEIGHTS" in summary and "demo/app.py" in summary
    assert (
        "--input " + str(datasets_root / "synthetic_gres" / "images" / "val" / "000000.png")
        in summary
    )
    # the dataset and its text encoder were generated on first use
    assert (datasets_root / "synthetic_gres" / "text_encoder" / "vocab.json").exists()
    assert (output / "last_checkpoint").read_text() == "model_final.pth"
    assert {"model_0000001.pth", "model_0000003.pth", "model_final.pth", "config.yaml"} <= set(
        os.listdir(output)
    )
    # The run's config names the copy of the pre-trained trunk that it loaded (made for its
    # settings, never rewritten by a run of another seed), so that the run can be repeated.
    trunk = yaml.safe_load((output / "config.yaml").read_text())["MODEL"]["TIMM"][
        "PRETRAINED_WEIGHTS"
    ]
    assert ".pth.by_settings" in trunk and os.path.isfile(trunk)
    log = (output / "log.txt").read_text()
    assert "Training inputs from iteration 0 on: 32x32" in log
    assert "Training inputs from iteration 2 on: 64x64" in log
    rows = _metrics_rows(output)
    assert [r["iteration"] for r in rows if "total_loss" in r][-1] == 3
    final = rows[-1]  # the evaluation after training is logged too
    assert "grefcoco/gIoU" in final and "grefcoco/N_acc" in final
    results_file = output / "inference" / "synthetic_gres_val_results.json"
    assert results_file.exists()

    weights = str(output / "model_final.pth")
    eval_dir = tmp_path / "eval"
    args = train_net.default_argument_parser().parse_args(
        [
            "--config-file",
            CONFIG,
            "--eval-only",
            *TINY,
            "MODEL.WEIGHTS",
            weights,
            "OUTPUT_DIR",
            str(eval_dir),
        ]
    )
    grouped = train_net.main(args)
    args.opts += [
        "DATALOADER.GROUP_EXPRESSIONS_BY_IMAGE",
        "False",
        "OUTPUT_DIR",
        str(tmp_path / "eval_ungrouped"),
    ]
    ungrouped = train_net.main(args)
    # Detectron2 returns the single dataset's dict itself
    grouped, ungrouped = grouped["grefcoco"], ungrouped["grefcoco"]
    assert grouped["num_expressions"] == ungrouped["num_expressions"] > 0
    for key, value in grouped.items():
        assert ungrouped[key] == pytest.approx(value, abs=1e-6), key
    # the eval-only run scored the checkpoint as the end of training did
    with open(results_file) as f:
        at_end_of_training = json.load(f)
    assert json.dumps(at_end_of_training, sort_keys=True) == json.dumps(
        json.load(open(eval_dir / "inference" / "synthetic_gres_val_results.json")), sort_keys=True
    )


def test_two_gloo_processes_train_and_evaluate(tmp_path, datasets_root, capsys):
    output = tmp_path / "ddp"
    rc, err = run(
        [
            "--config-file",
            CONFIG,
            "--num-gpus",
            "2",
            *TINY,
            "SOLVER.MAX_ITER",
            "3",
            "SOLVER.CHECKPOINT_PERIOD",
            "100",
            "OUTPUT_DIR",
            str(output),
        ],
        capsys,
    )
    assert rc == 0, err
    assert (output / "model_final.pth").exists()
    log = (output / "log.txt").read_text()
    assert "World size: 2" in log
    assert "grefcoco/gIoU" in _metrics_rows(output)[-1]


@pytest.mark.slow
def test_resume_after_sigkill_continues_with_the_saved_state(tmp_path):
    """A run killed with SIGKILL right after a checkpoint resumes from it: same iteration, and the
    optimizer and lr schedule continue where they were (the lr after resuming equals the lr of an
    uninterrupted run at that iteration)."""
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "datasets"), PYTHONUNBUFFERED="1")
    common = [
        sys.executable,
        os.path.join(REPO, "train_net.py"),
        "--config-file",
        CONFIG,
        *TINY,
        "SOLVER.MAX_ITER",
        "40",
        "SOLVER.CHECKPOINT_PERIOD",
        "10",
    ]
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        common + ["OUTPUT_DIR", str(killed)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 600
    while (
        not (killed / "model_0000019.pth").exists()
        and time.time() < deadline
        and process.poll() is None
    ):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (killed / "model_0000019.pth").exists()
    assert not (killed / "model_final.pth").exists()
    saved = (killed / "last_checkpoint").read_text()
    assert saved in {
        "model_0000009.pth",
        "model_0000019.pth",
        "model_0000029.pth",
    }  # never a half-written file
    torch.load(killed / saved, weights_only=False)  # loads

    resumed = subprocess.run(
        common[:4] + ["--resume"] + common[4:] + ["OUTPUT_DIR", str(killed)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    start = int(saved[len("model_") : -len(".pth")]) + 1
    assert f"Starting training from iteration {start}" in (killed / "log.txt").read_text()

    straight = tmp_path / "straight"
    subprocess.run(common + ["OUTPUT_DIR", str(straight)], env=env, check=True, capture_output=True)
    lr_resumed = {r["iteration"]: r["lr"] for r in _metrics_rows(killed) if "lr" in r}
    lr_straight = {r["iteration"]: r["lr"] for r in _metrics_rows(straight) if "lr" in r}
    assert max(lr_resumed) == max(lr_straight) == 39
    for iteration in lr_straight:
        if iteration >= start:
            assert lr_resumed[iteration] == pytest.approx(lr_straight[iteration], rel=1e-9)


def test_trainer_constructor_still_mirrors_detectron2s():
    """Trainer.__init__ copies DefaultTrainer.__init__ (to make DDP work on CPUs): it must set
    every attribute detectron2's sets, or detectron2 has changed and the copy must follow."""
    import ast
    import inspect
    import textwrap

    from detectron2.engine import DefaultTrainer

    def assigned_attributes(function):
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
        return {
            node.attr
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id == "self"
        }

    theirs = assigned_attributes(DefaultTrainer.__init__)
    # ours alone: the train mapper, whose input size a coarse-to-fine schedule changes
    ours = assigned_attributes(train_net.Trainer.__init__) - {"train_mapper"}
    assert {"_trainer", "checkpointer", "scheduler", "start_iter", "max_iter", "cfg"} <= theirs
    assert theirs == ours, f"detectron2's DefaultTrainer.__init__ changed: {theirs ^ ours}"


def test_a_schedule_in_epochs_becomes_iterations(tmp_path, datasets_root, capsys):
    """12 training images, each a sample with its expressions, 2 per batch: 1 epoch = 6 steps."""
    output = tmp_path / "epochs"
    argv = ["--config-file", CONFIG, *TINY, "SOLVER.EPOCHS", "2", "SOLVER.MAX_ITER", "999"]
    rc, err = run(
        argv + ["SOLVER.CHECKPOINT_PERIOD_EPOCHS", "1", "OUTPUT_DIR", str(output)], capsys
    )
    assert rc == 0, err
    saved = (output / "config.yaml").read_text()
    assert "MAX_ITER: 12\n" in saved and "CHECKPOINT_PERIOD: 6\n" in saved
    assert {"model_0000005.pth", "model_final.pth"} <= set(os.listdir(output))


@pytest.mark.slow
def test_the_same_seed_gives_the_same_model_and_metrics_in_two_processes(tmp_path):
    """Everything ``make train`` does from nothing — the dataset, the backbone pre-training, the
    training, the evaluation — twice, in two processes with different string-hash seeds and their
    own dataset folders, the second with glibc's default allocator settings: the weights and the
    metrics come out bit for bit the same."""
    results, pretrained_trunks = [], []
    for run, hash_seed, keep_freed in ((1, "1", "True"), (2, "2", "False")):
        env = dict(
            os.environ,
            DETECTRON2_DATASETS=str(tmp_path / f"datasets{run}"),
            PYTHONHASHSEED=hash_seed,
        )
        output = tmp_path / f"run{run}"
        subprocess.run(
            [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", CONFIG, *TINY]
            + ["SOLVER.MAX_ITER", "6", "SEED", "3", "OUTPUT_DIR", str(output)]
            + ["KEEP_FREED_HOST_MEMORY", keep_freed],
            env=env,
            check=True,
            capture_output=True,
        )
        weights = torch.load(output / "model_final.pth", map_location="cpu", weights_only=False)
        pretrained = tmp_path / f"datasets{run}" / "synthetic_gres" / "pretrained_backbone"
        pretrained_trunks.append(torch.load(next(pretrained.glob("*.pth")), map_location="cpu"))
        with open(output / "inference" / "synthetic_gres_val_results.json") as f:
            results.append((weights["model"], json.load(f)))
    # The pre-trained trunk, every tensor (the file's bytes differ: torch.save names the archive
    # after the temporary file it writes first).
    assert pretrained_trunks[0].keys() == pretrained_trunks[1].keys()
    for name, value in pretrained_trunks[0].items():
        assert torch.equal(value, pretrained_trunks[1][name]), name
    (first_weights, first_metrics), (second_weights, second_metrics) = results
    assert first_weights.keys() == second_weights.keys()
    for name, value in first_weights.items():
        assert torch.equal(value, second_weights[name]), name
    assert json.dumps(first_metrics, sort_keys=True) == json.dumps(second_metrics, sort_keys=True)
