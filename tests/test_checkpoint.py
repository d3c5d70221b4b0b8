"""Checkpoints are written atomically: a failure during a save never leaves `last_checkpoint`
naming a broken file."""
import os

import pytest
import torch
from torch import nn

from instalign_d2.engine import AtomicCheckpointer


def test_save_then_load_round_trip(tmp_path):
    model = nn.Linear(3, 2)
    checkpointer = AtomicCheckpointer(model, save_dir=str(tmp_path))
    checkpointer.save("model_0000009", iteration=9)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    other = nn.Linear(3, 2)
    loaded = AtomicCheckpointer(other, save_dir=str(tmp_path)).resume_or_load("", resume=True)
    assert loaded["iteration"] == 9
    assert torch.equal(other.weight, model.weight)
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def test_failure_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = nn.Linear(3, 2)
    checkpointer = AtomicCheckpointer(model, save_dir=str(tmp_path))
    checkpointer.save("model_0000009", iteration=9)
    before = (tmp_path / "model_0000009.pth").read_bytes()

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_0000019", iteration=19)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_0000009", iteration=99)  # overwriting the same name is safe too
    monkeypatch.undo()

    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    assert not (tmp_path / "model_0000019.pth").exists()
    assert (tmp_path / "model_0000009.pth").read_bytes() == before
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []
    assert AtomicCheckpointer(nn.Linear(3, 2), save_dir=str(tmp_path)).resume_or_load("", resume=True)["iteration"] == 9
