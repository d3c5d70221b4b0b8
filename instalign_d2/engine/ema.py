"""An exponential moving average of the weights, used for the final checkpoint and evaluation.

Not in the paper (nor in Mask2Former or ReLA): with ``MODEL_EMA.ENABLED`` the trainer keeps
``ema = decay * ema + (1 - decay) * weights`` after every step (parameters and buffers, timm's
``ModelEmaV3``), and at the end of the schedule the averaged weights replace the trained ones, so
that ``model_final.pth`` and the evaluation after training are those of the average. Checkpoints
saved on the way hold the trained weights: ``--resume`` then restarts the average from them.
"""

from __future__ import annotations

import logging

import torch
from detectron2.engine import HookBase
from timm.utils import ModelEmaV3

from instalign_d2.engine.ddp import unwrap_model

logger = logging.getLogger(__name__)


class ModelEMAHook(HookBase):
    """Average the trainer's model after each step; load the average into it after the last.

    Register it before Detectron2's ``PeriodicCheckpointer`` and ``EvalHook``: they save and score
    the model after the last step, which must by then hold the average.
    """

    def __init__(self, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(
                f"MODEL_EMA.DECAY must lie strictly between 0 and 1, got {decay}: the weight that "
                "the average keeps at each step (0.998 averages over about the last 500 steps)"
            )
        self.decay = decay
        self.ema = None

    def decay_at(self, step: int) -> float:
        """The decay after step ``step`` (from 0): the plain mean of the weights so far until that
        reaches ``decay``, so that the average does not hold on to the untrained initial weights
        (with 0.998 from the start they would still weigh 1.5 % after 2100 steps)."""
        return min(self.decay, step / (step + 1.0))

    def before_train(self):
        model = unwrap_model(self.trainer.model)
        self.ema = ModelEmaV3(model, decay=self.decay, stochastic_rounding=False)
        logger.info("Keeping an exponential moving average of the weights, decay %g", self.decay)

    def after_step(self):
        model = unwrap_model(self.trainer.model)
        # The decay of each step is set here (ModelEmaV3's own warm-up follows a slower formula).
        self.ema.apply_update_(model, self.decay_at(self.trainer.iter))
        if self.trainer.iter + 1 >= self.trainer.max_iter:
            self.load_average_into(model)

    def load_average_into(self, model: torch.nn.Module) -> None:
        """Copy the averaged parameters and buffers into ``model``."""
        with torch.no_grad():
            for target, average in zip(
                model.state_dict().values(), self.ema.module.state_dict().values()
            ):
                target.copy_(average)
        logger.info("The model now holds the moving average of its weights (decay %g)", self.decay)
