"""Learning-rate schedules: the paper's linear decay (BASE_LR -> BASE_LR_END at MAX_ITER) with
optional warm-up, and detectron2's own schedules for every other name."""

from __future__ import annotations

import torch
from detectron2.solver import LRMultiplier, WarmupParamScheduler
from detectron2.solver import build_lr_scheduler as build_detectron2_lr_scheduler
from fvcore.common.param_scheduler import LinearParamScheduler


def build_lr_scheduler(cfg, optimizer: torch.optim.Optimizer):
    """``WarmupLinearDecayLR``: lr falls linearly from BASE_LR to BASE_LR_END at MAX_ITER
    (paper §4.1: 1e-4 to 1e-6), after ``WARMUP_ITERS`` of warm-up. Other names: detectron2's."""
    solver = cfg.SOLVER
    if solver.LR_SCHEDULER_NAME != "WarmupLinearDecayLR":
        return build_detectron2_lr_scheduler(cfg, optimizer)
    if solver.BASE_LR <= 0 or not 0 <= solver.BASE_LR_END <= solver.BASE_LR:
        raise ValueError(
            f"SOLVER.BASE_LR_END={solver.BASE_LR_END} must lie in [0, SOLVER.BASE_LR={solver.BASE_LR}] "
            "for WarmupLinearDecayLR."
        )
    # Multipliers of each group's own lr, so the backbone / text-encoder multipliers are kept.
    decay = LinearParamScheduler(1.0, solver.BASE_LR_END / solver.BASE_LR)
    schedule = WarmupParamScheduler(
        decay,
        solver.WARMUP_FACTOR,
        min(solver.WARMUP_ITERS / solver.MAX_ITER, 1.0),
        solver.WARMUP_METHOD,
        solver.RESCALE_INTERVAL,
    )
    return LRMultiplier(optimizer, multiplier=schedule, max_iter=solver.MAX_ITER)
