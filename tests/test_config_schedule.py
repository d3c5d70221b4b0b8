"""The schedule in epochs: SOLVER.EPOCHS (and the epoch periods) -> iterations, from the train split."""

import logging
import os

import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog

from instalign_d2 import add_instalign_config
from instalign_d2.engine import ConfigError
from instalign_d2.solver import apply_epoch_schedule, iterations_for_epochs
from instalign_d2.synthetic.generator import generate_synthetic_gres
from instalign_d2.synthetic.params import SyntheticParams

FAKE = "schedule_test_fake_train"
BROKEN = "schedule_test_broken_train"


def _fake_split():
    # 10 expressions of 4 images (4 + 3 + 2 + 1), the images not in order.
    images = ["a", "b", "a", "c", "a", "b", "d", "a", "c", "b"]
    return [{"file_name": f"{name}.png", "image_id": i} for i, name in enumerate(images)]


def _broken_split():
    raise AssertionError("the train split must not be read when no epoch key is set")


for _name, _loader in ((FAKE, _fake_split), (BROKEN, _broken_split)):
    if _name not in DatasetCatalog.list():
        DatasetCatalog.register(_name, _loader)


def make_cfg(train=FAKE, **solver):
    cfg = add_instalign_config(get_cfg())
    cfg.DATASETS.TRAIN = (train,)
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.CHECKPOINT_PERIOD, cfg.TEST.EVAL_PERIOD = 1000, 500, 250
    for key, value in solver.items():
        setattr(cfg.SOLVER, key, value)
    return cfg


class LogLines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def schedule_log():
    # A handler on the module's own logger: "instalign_d2" may not propagate to the root logger
    # once Detectron2's setup_logger has configured it.
    handler, logger = LogLines(), logging.getLogger("instalign_d2.solver.schedule")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_iterations_for_epochs():
    assert iterations_for_epochs(210_000, 32, 20) == 131_250  # gRefCOCO's order of magnitude
    assert iterations_for_epochs(10, 4, 3) == 8  # 30 samples: 7.5 batches, the last one completed
    assert iterations_for_epochs(12, 4, 1) == 3
    assert iterations_for_epochs(12, 4, 0) == 0
    for bad in ((0, 4, 1), (10, 0, 1), (10, 4, -1)):
        with pytest.raises(ValueError):
            iterations_for_epochs(*bad)


@pytest.mark.parametrize(
    "per_image, samples, unit",
    [(0, 10, "expressions"), (2, 4, "images with up to 2 expressions")],
)
def test_epochs_set_the_iteration_keys(schedule_log, per_image, samples, unit):
    cfg = make_cfg(EPOCHS=3, IMS_PER_BATCH=4, CHECKPOINT_PERIOD_EPOCHS=1)
    cfg.TEST.EVAL_PERIOD_EPOCHS = 2
    cfg.DATALOADER.TRAIN_EXPRESSIONS_PER_IMAGE = per_image
    cfg.freeze()
    out = apply_epoch_schedule(cfg)

    # A sample is an expression, or an image with up to k of its expressions (4 distinct images).
    assert out.SOLVER.MAX_ITER == -(-3 * samples // 4)
    assert out.SOLVER.CHECKPOINT_PERIOD == -(-samples // 4)
    assert out.TEST.EVAL_PERIOD == -(-2 * samples // 4)
    assert out.is_frozen() and out is not cfg
    assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.CHECKPOINT_PERIOD, cfg.TEST.EVAL_PERIOD) == (
        1000,
        500,
        250,
    )
    assert out.SOLVER.WARMUP_ITERS == cfg.SOLVER.WARMUP_ITERS  # warm-up stays in iterations
    (line,) = schedule_log
    assert f"{samples} training {unit} (10 expressions) at 4 per batch" in line
    assert f"3 epochs = {out.SOLVER.MAX_ITER} iterations" in line


def test_each_epoch_key_is_independent():
    out = apply_epoch_schedule(make_cfg(IMS_PER_BATCH=4, CHECKPOINT_PERIOD_EPOCHS=2))
    assert (out.SOLVER.MAX_ITER, out.SOLVER.CHECKPOINT_PERIOD, out.TEST.EVAL_PERIOD) == (
        1000,
        5,
        250,
    )
    assert not out.is_frozen()


def test_no_epoch_key_leaves_the_config_and_reads_no_data(schedule_log):
    cfg = make_cfg(train=BROKEN)
    assert apply_epoch_schedule(cfg) is cfg
    assert schedule_log == []
    with pytest.raises(ConfigError, match="SOLVER.EPOCHS=-1"):
        apply_epoch_schedule(make_cfg(train=BROKEN, EPOCHS=-1))


def test_epochs_on_the_synthetic_train_split(tmp_path, monkeypatch, repo_root):
    """The tiny config's train split, generated small: its expressions and images, counted the
    way the train loader draws them."""
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    params = SyntheticParams(
        num_train_images=12, num_val_images=2, num_test_images=2, image_size=64
    )
    stats = generate_synthetic_gres(str(tmp_path / "synthetic_gres"), params, workers=1)["train"]
    expressions, images = stats["expressions"], stats["images"]
    assert images == 12 and expressions > images

    cfg = add_instalign_config(get_cfg())
    cfg.merge_from_file(os.path.join(repo_root, "configs", "synthetic", "instalign_tiny.yaml"))
    cfg.SOLVER.EPOCHS, cfg.SOLVER.IMS_PER_BATCH = 2, 8
    per_image = cfg.DATALOADER.TRAIN_EXPRESSIONS_PER_IMAGE
    assert per_image > 0  # the tiny config trains on images with their expressions
    assert apply_epoch_schedule(cfg).SOLVER.MAX_ITER == -(-2 * images // 8) == 3

    cfg.DATALOADER.TRAIN_EXPRESSIONS_PER_IMAGE = 0
    assert apply_epoch_schedule(cfg).SOLVER.MAX_ITER == -(-2 * expressions // 8)


def test_paper_configs_train_for_20_epochs(repo_root):
    for name in ("grefcoco/instalign_swin_base.yaml", "refzom/instalign_swin_base.yaml"):
        cfg = add_instalign_config(get_cfg())
        cfg.merge_from_file(os.path.join(repo_root, "configs", name))
        assert cfg.SOLVER.EPOCHS == 20, name
        assert cfg.MODEL.INSTALIGN.SCORE_LOSS_NORMALIZATION == "num_instances", name
