"""Optimizer and learning-rate schedule of InstAlign training (paper §4.1, supp. §8)."""

from .lr_scheduler import build_lr_scheduler  # noqa: F401
from .optimizer import build_optimizer, build_param_groups  # noqa: F401
from .schedule import apply_epoch_schedule, iterations_for_epochs  # noqa: F401
