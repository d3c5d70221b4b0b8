"""Coarse-to-fine training: smaller training inputs for the first part of the schedule.

On the CPU a training run on 96 x 96 inputs costs about three quarters of one on 128 x 128, and at
equal compute the extra steps learn more than the resolution gives (docs/experiments.md). The
schedule keeps the sharper inputs for the end of training and for evaluation:
``INPUT.EARLY_TRAIN_SIZE`` for the first ``INPUT.EARLY_TRAIN_FRACTION`` of ``SOLVER.MAX_ITER``,
``INPUT.IMAGE_SIZE`` after it.

The hook sets the size on the train mapper before each step. That reaches the mapper only when
it runs in the trainer's process (``DATALOADER.NUM_WORKERS 0``); loader workers hold copies.
"""

from __future__ import annotations

import logging
from typing import NamedTuple, Optional

from detectron2.engine import HookBase

from .errors import ConfigError

logger = logging.getLogger(__name__)


class ImageSizeSchedule(NamedTuple):
    """Train on ``early_size`` before iteration ``switch_iter``, on ``final_size`` from it on."""

    early_size: int
    final_size: int
    switch_iter: int

    def size_at(self, iteration: int) -> int:
        return self.early_size if iteration < self.switch_iter else self.final_size

    @classmethod
    def from_config(cls, cfg) -> Optional["ImageSizeSchedule"]:
        """The config's schedule, None when ``INPUT.EARLY_TRAIN_SIZE`` is 0 (off).

        Raises :class:`ConfigError` for a schedule that cannot work."""
        size, fraction = int(cfg.INPUT.EARLY_TRAIN_SIZE), float(cfg.INPUT.EARLY_TRAIN_FRACTION)
        if size == 0:
            return None
        if size < 0:
            raise ConfigError(
                f"INPUT.EARLY_TRAIN_SIZE={size}: give a positive input side, or 0 to train at "
                "INPUT.IMAGE_SIZE throughout"
            )
        if not 0.0 < fraction <= 1.0:
            raise ConfigError(
                f"INPUT.EARLY_TRAIN_FRACTION={fraction}: with INPUT.EARLY_TRAIN_SIZE={size} give the "
                "share of SOLVER.MAX_ITER trained at that size, in (0, 1], e.g. 0.7"
            )
        if cfg.DATALOADER.NUM_WORKERS != 0:
            raise ConfigError(
                f"INPUT.EARLY_TRAIN_SIZE={size} changes the input size during training, which reaches "
                f"the mapper only in the trainer's process: set DATALOADER.NUM_WORKERS 0 "
                f"(it is {cfg.DATALOADER.NUM_WORKERS})"
            )
        return cls(size, int(cfg.INPUT.IMAGE_SIZE), round(fraction * cfg.SOLVER.MAX_ITER))


class ImageSizeScheduleHook(HookBase):
    """Sets ``mapper.image_size`` to the schedule's size for the step about to run; also on a
    resumed run, whose first step may lie past the switch."""

    def __init__(self, mapper, schedule: ImageSizeSchedule):
        self._mapper = mapper
        self._schedule = schedule

    def before_step(self):
        size = self._schedule.size_at(self.trainer.iter)
        if self._mapper.image_size != size:
            logger.info(
                "Training inputs from iteration %d on: %dx%d", self.trainer.iter, size, size
            )
            self._mapper.image_size = size
