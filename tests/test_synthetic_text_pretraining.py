"""Masked-language-model pre-training of the synthetic text encoder, and its place in train_net."""

import filecmp
import json
import os
import sys

import pytest
import torch
from transformers import AutoModel, DataCollatorForLanguageModeling

from instalign_d2.synthetic import text_pretraining
from instalign_d2.synthetic.text_pretraining import masked_accuracy, pretrain_text_encoder
from instalign_d2.utils.tokenizer import load_tokenizer, tokenize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from test_train_net import CONFIG, TINY  # noqa: E402

import train_net  # noqa: E402


def test_pretraining_learns_the_corpus_and_follows_its_seed(tiny_text_encoder, tiny_corpus):
    kwargs = dict(iterations=60, batch_size=16, base_lr=3e-3, max_tokens=12)
    model, accuracy = pretrain_text_encoder(
        tiny_text_encoder, tiny_corpus, tiny_corpus, seed=0, **kwargs
    )
    again, accuracy_again = pretrain_text_encoder(
        tiny_text_encoder, tiny_corpus, tiny_corpus, seed=0, **kwargs
    )
    other, _ = pretrain_text_encoder(tiny_text_encoder, tiny_corpus, tiny_corpus, seed=1, **kwargs)
    for name, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name
    assert accuracy == accuracy_again
    assert not torch.equal(
        model.roberta.embeddings.word_embeddings.weight,
        other.roberta.embeddings.word_embeddings.weight,
    )
    # The same hidden words, named by the trained model and by one that has not been trained.
    untrained, _ = pretrain_text_encoder(
        tiny_text_encoder, tiny_corpus, tiny_corpus, seed=0, **{**kwargs, "iterations": 1}
    )
    tokenizer = load_tokenizer(tiny_text_encoder)
    tokens = tokenize(tokenizer, tiny_corpus * 4, 12)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, seed=5)
    inputs, labels = collator.torch_mask_tokens(tokens["input_ids"].clone())
    trained = masked_accuracy(model, inputs, labels, tokens["attention_mask"])
    assert trained > masked_accuracy(untrained, inputs, labels, tokens["attention_mask"]) + 0.2
    assert trained > 0.3


def test_bad_settings_name_the_keys(tiny_text_encoder, tiny_corpus):
    with pytest.raises(ValueError, match="SYNTHETIC_PRETRAIN.*ITERATIONS"):
        pretrain_text_encoder(
            tiny_text_encoder,
            tiny_corpus,
            tiny_corpus,
            iterations=0,
            batch_size=4,
            base_lr=1e-3,
            max_tokens=12,
            seed=0,
        )


def prepared(*opts):
    args = train_net.default_argument_parser().parse_args(["--config-file", CONFIG, *TINY, *opts])
    return train_net.prepare_data(train_net.build_config(args))


def as_dict(opts):
    return dict(zip(opts[::2], opts[1::2]))


@pytest.fixture
def datasets_root(tmp_path, monkeypatch):
    root = tmp_path / "datasets"
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    return root


def test_train_net_makes_the_encoder_once_per_settings_and_points_the_run_at_it(
    datasets_root, monkeypatch
):
    pretrain = ["MODEL.TEXT_ENCODER.SYNTHETIC_PRETRAIN.ITERATIONS", "3"]
    pretrain += ["MODEL.TEXT_ENCODER.SYNTHETIC_PRETRAIN.BATCH_SIZE", "4"]
    assert "MODEL.TEXT_ENCODER.NAME" not in prepared()  # off by default

    opts = prepared(*pretrain)
    made = as_dict(opts)
    assert made["MODEL.TEXT_ENCODER.PRETRAINED"] == "True"
    directory = made["MODEL.TEXT_ENCODER.NAME"]
    source = datasets_root / "synthetic_gres" / "text_encoder"
    assert os.path.dirname(directory) == str(
        datasets_root / "synthetic_gres" / "pretrained_text_encoder"
    )
    for name in ("vocab.json", "merges.txt", "config.json"):  # the generator's tokenizer and model
        assert filecmp.cmp(source / name, os.path.join(directory, name), shallow=False), name
    with open(os.path.join(directory, "pretraining.json")) as f:
        record = json.load(f)
    assert record["settings"]["iterations"] == 3 and record["settings"]["seed"] == 0
    weights = AutoModel.from_pretrained(directory, local_files_only=True).state_dict()
    generated = AutoModel.from_pretrained(str(source), local_files_only=True).state_dict()
    name = "embeddings.word_embeddings.weight"
    assert not torch.equal(weights[name], generated[name])

    # Reused, not made again; another seed gets its own directory.
    def no_second_pretraining(*args, **kwargs):
        raise AssertionError("pre-trained again")

    monkeypatch.setattr(text_pretraining, "pretrain_text_encoder", no_second_pretraining)
    assert prepared(*pretrain) == opts
    monkeypatch.undo()
    monkeypatch.setenv("DETECTRON2_DATASETS", str(datasets_root))
    assert as_dict(prepared(*pretrain, "SEED", "1"))["MODEL.TEXT_ENCODER.NAME"] != directory


def test_eval_only_never_pretrains(datasets_root):
    args = train_net.default_argument_parser().parse_args(
        [
            "--config-file",
            CONFIG,
            "--eval-only",
            "MODEL.TEXT_ENCODER.SYNTHETIC_PRETRAIN.ITERATIONS",
            "50",
        ]
    )
    assert train_net.build_config(args).MODEL.TEXT_ENCODER.SYNTHETIC_PRETRAIN.ITERATIONS == 0
