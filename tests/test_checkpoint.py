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
    assert (
        AtomicCheckpointer(nn.Linear(3, 2), save_dir=str(tmp_path)).resume_or_load("", resume=True)[
            "iteration"
        ]
        == 9
    )


def _tiny_instalign(tiny_cfg, encoder_dir):
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    return build_model(tiny_cfg(text_encoder_dir=encoder_dir))


def test_a_checkpoint_refuses_a_model_with_another_tokenizer(tiny_cfg, tiny_corpus, tmp_path):
    from instalign_d2.engine.checkpoint import TokenizerMismatchError, tokenizer_fingerprint
    from instalign_d2.synthetic.text_encoder import write_local_text_encoder

    def encoder(name, corpus):
        return write_local_text_encoder(str(tmp_path / name), corpus, vocab_size=300, max_tokens=12)

    first = encoder("first", tiny_corpus * 4)
    same = encoder("same", tiny_corpus * 4)  # the same corpus again: the same ids
    other = encoder("other", tiny_corpus[::-1] + ["the cyan hexagon below"])
    model = _tiny_instalign(tiny_cfg, first)
    fingerprint = tokenizer_fingerprint(model.text_encoder.tokenizer)
    model.text_encoder.tokenize(["the red square"])  # tokenising must not change the fingerprint
    assert tokenizer_fingerprint(model.text_encoder.tokenizer) == fingerprint
    with torch.no_grad():
        model.aggregation.prelu.weight.fill_(0.7)  # a trained value, unlike a fresh model's 0.25
    AtomicCheckpointer(model, save_dir=str(tmp_path / "out")).save("model_final")
    saved = torch.load(tmp_path / "out" / "model_final.pth", weights_only=True)
    assert saved["tokenizer_fingerprint"] == fingerprint

    loaded = _tiny_instalign(tiny_cfg, same)
    AtomicCheckpointer(loaded).load(str(tmp_path / "out" / "model_final.pth"))
    assert torch.allclose(loaded.aggregation.prelu.weight, torch.tensor(0.7))

    mismatched = _tiny_instalign(tiny_cfg, other)
    with pytest.raises(TokenizerMismatchError, match="trained with another tokenizer") as error:
        AtomicCheckpointer(mismatched).load(str(tmp_path / "out" / "model_final.pth"))
    assert "\n" not in str(error.value) and "MODEL.TEXT_ENCODER.NAME" in str(error.value)
