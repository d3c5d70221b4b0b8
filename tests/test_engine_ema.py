"""MODEL_EMA: the moving average of the weights, its decay per step, and where the trainer puts it."""

from types import SimpleNamespace

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.engine.hooks import EvalHook, PeriodicCheckpointer
from torch import nn

from instalign_d2.config import add_instalign_config
from instalign_d2.engine.ema import ModelEMAHook


def _train(hook, model, values, max_iter):
    """Run ``hook`` over steps that set every weight of ``model`` to the next of ``values``."""
    trainer = SimpleNamespace(model=model, iter=0, max_iter=max_iter)
    hook.trainer = trainer
    hook.before_train()
    for step, value in enumerate(values):
        trainer.iter = step
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(value)
            model[1].running_mean.fill_(10 * value)
            model[1].num_batches_tracked.fill_(step + 1)
        hook.after_step()


def test_the_average_is_the_mean_until_the_decay_then_exponential():
    hook = ModelEMAHook(decay=0.5)
    assert [hook.decay_at(t) for t in range(4)] == [0.0, 0.5, 0.5, 0.5]
    assert ModelEMAHook(decay=0.9).decay_at(3) == pytest.approx(0.75)  # the mean of 4 steps
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    _train(hook, model, [1.0, 2.0, 3.0, 5.0], max_iter=4)
    # 1 -> mean(1, 2) = 1.5 -> 0.5 * 1.5 + 0.5 * 3 = 2.25 -> 0.5 * 2.25 + 0.5 * 5 = 3.625
    for p in model.parameters():
        assert torch.allclose(p, torch.full_like(p, 3.625))
    assert torch.allclose(model[1].running_mean, torch.full((2,), 36.25))  # buffers too
    assert model[1].num_batches_tracked.item() == 4  # counters are copied, not averaged


def test_the_model_keeps_its_weights_until_the_last_step():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    _train(ModelEMAHook(decay=0.5), model, [1.0, 2.0, 3.0], max_iter=10)
    assert all(torch.equal(p, torch.full_like(p, 3.0)) for p in model.parameters())


@pytest.mark.parametrize("decay", [0.0, 1.0, 1.5])
def test_a_decay_outside_zero_one_is_named(decay):
    with pytest.raises(ValueError, match="MODEL_EMA.DECAY must lie strictly between 0 and 1"):
        ModelEMAHook(decay)


def test_the_trainer_averages_before_it_saves_and_evaluates(monkeypatch):
    import train_net

    trainer = train_net.Trainer.__new__(train_net.Trainer)  # only its hooks are built
    trainer.cfg = add_instalign_config(get_cfg())
    trainer.cfg.MODEL_EMA.ENABLED = True
    trainer.cfg.MODEL_EMA.DECAY = 0.99
    checkpointer = PeriodicCheckpointer(SimpleNamespace(path_manager=None), period=10)
    evaluation = EvalHook(0, lambda: {})
    monkeypatch.setattr(
        train_net.DefaultTrainer, "build_hooks", lambda self: ["timer", checkpointer, evaluation]
    )
    hooks = trainer.build_hooks()
    assert isinstance(hooks[1], ModelEMAHook) and hooks[1].decay == 0.99
    assert hooks[2:] == [checkpointer, evaluation]
    trainer.cfg.MODEL_EMA.ENABLED = False
    assert trainer.build_hooks() == ["timer", checkpointer, evaluation]
