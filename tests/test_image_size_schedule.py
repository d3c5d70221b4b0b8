"""Coarse-to-fine training: INPUT.EARLY_TRAIN_SIZE for the first part of the schedule."""

from types import SimpleNamespace

import pytest
from detectron2.config import get_cfg

from instalign_d2 import add_instalign_config
from instalign_d2.engine import ConfigError
from instalign_d2.engine.image_size_schedule import ImageSizeSchedule, ImageSizeScheduleHook


def _cfg(early=96, fraction=0.7, workers=0, size=128, max_iter=1000):
    cfg = get_cfg()
    add_instalign_config(cfg)
    cfg.INPUT.IMAGE_SIZE = size
    cfg.INPUT.EARLY_TRAIN_SIZE = early
    cfg.INPUT.EARLY_TRAIN_FRACTION = fraction
    cfg.DATALOADER.NUM_WORKERS = workers
    cfg.SOLVER.MAX_ITER = max_iter
    return cfg


def test_off_by_default():
    cfg = get_cfg()
    add_instalign_config(cfg)
    assert ImageSizeSchedule.from_config(cfg) is None


def test_the_switch_falls_at_the_fraction_of_the_schedule():
    schedule = ImageSizeSchedule.from_config(_cfg(early=96, fraction=0.7, max_iter=1000))
    assert schedule == ImageSizeSchedule(96, 128, 700)
    assert [schedule.size_at(i) for i in (0, 699, 700, 999)] == [96, 96, 128, 128]
    whole = ImageSizeSchedule.from_config(_cfg(fraction=1.0, max_iter=10))
    assert all(whole.size_at(i) == 96 for i in range(10))


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"early": -8}, "INPUT.EARLY_TRAIN_SIZE=-8"),
        ({"fraction": 0.0}, "INPUT.EARLY_TRAIN_FRACTION=0.0"),
        ({"fraction": 1.5}, "INPUT.EARLY_TRAIN_FRACTION=1.5"),
        ({"workers": 2}, "set DATALOADER.NUM_WORKERS 0"),
    ],
)
def test_a_schedule_that_cannot_work_is_named(kwargs, expected):
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        ImageSizeSchedule.from_config(_cfg(**kwargs))


def test_the_hook_sets_the_size_of_each_step_also_after_a_resume():
    mapper = SimpleNamespace(image_size=128)
    hook = ImageSizeScheduleHook(mapper, ImageSizeSchedule(96, 128, 3))
    hook.trainer = SimpleNamespace(iter=0)
    sizes = []
    for iteration in range(5):
        hook.trainer.iter = iteration
        hook.before_step()
        sizes.append(mapper.image_size)
    assert sizes == [96, 96, 96, 128, 128]
    resumed = SimpleNamespace(image_size=128)
    hook = ImageSizeScheduleHook(resumed, ImageSizeSchedule(96, 128, 3))
    hook.trainer = SimpleNamespace(iter=4)  # a run resumed past the switch keeps the final size
    hook.before_step()
    assert resumed.image_size == 128
