"""TextEncoder: a tiny RoBERTa written offline into tmp_path (no download anywhere)."""

import logging
import threading
import time

import pytest
import torch
from detectron2.config import get_cfg

from instalign_d2.config import add_instalign_config
from instalign_d2.modeling.language import TextEncoder, build_text_encoder
from instalign_d2.synthetic.text_encoder import write_local_text_encoder
from instalign_d2.utils.tokenizer import (
    TextEncoderNotFoundError,
    ThreadSafeTokenizer,
    load_tokenizer,
    tokenize,
)

CORPUS = [
    "the red cube on the left",
    "two green spheres",
    "all cubes except the blue one",
    "the small yellow cylinder behind the red cube",
    "both spheres",
]
HIDDEN = 32


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("text") / "tiny_roberta"
    write_local_text_encoder(
        str(directory),
        CORPUS,
        vocab_size=300,
        hidden_size=HIDDEN,
        num_layers=1,
        num_heads=2,
        intermediate_size=64,
        max_tokens=20,
        save_weights=True,
        seed=0,
    )
    return str(directory)


def make_encoder(encoder_dir, **kwargs):
    options = dict(name=encoder_dir, out_dim=24, max_tokens=12, pretrained=True)
    options.update(kwargs)
    return TextEncoder(**options)


def test_tokenize_gives_real_ids_and_pads_with_roberta_pad_id(encoder_dir):
    encoder = make_encoder(encoder_dir)
    batch = encoder.tokenize(["the red cube on the left", "two green spheres"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape == (2, 12) and ids.dtype == mask.dtype == torch.int64
    assert encoder.pad_token_id == 1
    for row, sentence in enumerate(["the red cube on the left", "two green spheres"]):
        real = ids[row][mask[row] == 1]
        assert real[0] == 0 and real[-1] == 2  # <s> ... </s>
        assert (real != 3).all()  # no <unk>: the BPE vocabulary was really loaded
        assert encoder.tokenizer.decode(real, skip_special_tokens=True).strip() == sentence
        assert (ids[row][mask[row] == 0] == 1).all()
    assert mask[1].sum() < mask[0].sum()  # the shorter sentence has padding


def test_forward_shapes_and_padding_mask(encoder_dir):
    torch.manual_seed(0)
    encoder = make_encoder(encoder_dir).eval()
    batch = encoder.tokenize(["two green spheres", "the small yellow cylinder behind the red cube"])
    features, pad_mask = encoder(batch["input_ids"], batch["attention_mask"])
    assert features.shape == (2, 12, 24) and features.dtype == torch.float32
    assert encoder.out_dim == 24 and encoder.max_tokens == 12
    assert pad_mask.dtype == torch.bool
    assert torch.equal(pad_mask, batch["attention_mask"] == 0)
    assert torch.isfinite(features).all()


def test_padding_does_not_change_the_real_tokens_features(encoder_dir):
    encoder = make_encoder(encoder_dir).eval()
    batch = encoder.tokenize(["two green spheres"])
    length = int(batch["attention_mask"].sum())
    padded, _ = encoder(batch["input_ids"], batch["attention_mask"])
    unpadded, pad_mask = encoder(
        batch["input_ids"][:, :length], batch["attention_mask"][:, :length]
    )
    assert not pad_mask.any()
    assert torch.allclose(padded[:, :length], unpadded, atol=1e-5)


def test_gradient_reaches_the_transformer_and_the_projection(encoder_dir):
    encoder = make_encoder(encoder_dir).train()
    batch = encoder.tokenize(["both spheres", "all cubes"])
    features, pad_mask = encoder(batch["input_ids"], batch["attention_mask"])
    features[~pad_mask].square().mean().backward()
    word_embeddings = encoder.transformer.embeddings.word_embeddings.weight
    assert word_embeddings.grad is not None and word_embeddings.grad.abs().sum() > 0
    assert encoder.projection.weight.grad.abs().sum() > 0
    # The pooler is dropped, so every parameter takes part (DDP without find_unused_parameters).
    assert all(p.grad is not None for p in encoder.parameters())


def test_freeze_keeps_the_transformer_fixed_and_the_projection_trainable(encoder_dir):
    encoder = make_encoder(encoder_dir, freeze=True).train()
    assert all(not p.requires_grad for p in encoder.transformer.parameters())
    assert all(p.requires_grad for p in encoder.projection.parameters())
    assert not encoder.transformer.training and encoder.training  # dropout off
    batch = encoder.tokenize(["both spheres"])
    features, _ = encoder(batch["input_ids"], batch["attention_mask"])
    features.sum().backward()
    assert encoder.projection.weight.grad.abs().sum() > 0
    assert encoder.transformer.embeddings.word_embeddings.weight.grad is None
    again, _ = encoder(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(features, again)


def test_pretrained_loads_the_directory_weights_and_random_does_not(encoder_dir):
    from transformers import AutoModel

    saved = AutoModel.from_pretrained(
        encoder_dir, local_files_only=True
    ).embeddings.word_embeddings.weight
    torch.manual_seed(123)
    pretrained = make_encoder(
        encoder_dir, pretrained=True
    ).transformer.embeddings.word_embeddings.weight
    torch.manual_seed(123)
    random = make_encoder(
        encoder_dir, pretrained=False
    ).transformer.embeddings.word_embeddings.weight
    assert torch.equal(pretrained, saved)
    assert random.shape == saved.shape and not torch.allclose(random, saved)


def test_build_from_config_uses_hidden_dim_and_max_tokens(encoder_dir):
    cfg = add_instalign_config(get_cfg())
    cfg.MODEL.TEXT_ENCODER.NAME = encoder_dir
    cfg.MODEL.TEXT_ENCODER.MAX_TOKENS = 10
    cfg.MODEL.TEXT_ENCODER.PRETRAINED = False
    cfg.MODEL.TEXT_ENCODER.FREEZE = True
    cfg.MODEL.INSTALIGN.HIDDEN_DIM = 16
    encoder = build_text_encoder(cfg)
    assert encoder.out_dim == 16 and encoder.max_tokens == 10 and encoder.freeze
    batch = encoder.tokenize(["the red cube"])
    assert batch["input_ids"].shape == (1, 10)
    assert encoder(**batch)[0].shape == (1, 10, 16)


def test_missing_directory_is_one_clear_error(tmp_path):
    missing = tmp_path / "no_such_encoder"
    with pytest.raises(TextEncoderNotFoundError, match=r"MODEL\.TEXT_ENCODER\.NAME") as error:
        TextEncoder(name=str(missing), out_dim=8)
    assert str(missing) in str(error.value)


def test_max_tokens_beyond_the_position_table_is_refused(encoder_dir):
    # The tiny model has 22 position entries; RoBERTa numbers from 2, so 20 tokens fit, 21 do not.
    assert make_encoder(encoder_dir, max_tokens=20).max_tokens == 20
    with pytest.raises(ValueError, match=r"MAX_TOKENS=21 .* at most 20 tokens"):
        make_encoder(encoder_dir, max_tokens=21)


def test_bad_inputs_are_refused(encoder_dir):
    encoder = make_encoder(encoder_dir)
    with pytest.raises(ValueError, match="both be"):
        encoder(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="list of sentences"):
        encoder.tokenize("one string")


def tokenize_from_threads(tokenizer, threads: int = 4, calls: int = 150):
    """Every thread alternates the two ways the demo tokenises (a padded, truncated batch and one
    plain sentence); returns what went wrong, against the answers of one thread alone."""
    # The first is padded, the second truncated at 16 tokens (10 and 30 with this tokenizer).
    batch = [CORPUS[0], "the small yellow cylinder behind the red cube and two green spheres"]
    expected_batch = tokenize(tokenizer, batch, 16)["input_ids"].tolist()
    expected_plain = tokenizer(batch[1])["input_ids"]
    problems = []
    start = threading.Barrier(threads)

    def work(index):
        start.wait()
        try:
            for call in range(calls):
                if (index + call) % 2:
                    got = tokenize(tokenizer, batch, 16)["input_ids"].tolist()
                    if got != expected_batch:
                        problems.append(f"batch {got}")
                elif tokenizer(batch[1])["input_ids"] != expected_plain:
                    problems.append("plain sentence truncated")
        except Exception as exc:  # "Already borrowed", or a ragged batch that is no tensor
            problems.append(repr(exc))

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return problems


def test_thread_safe_tokenizer_gives_each_thread_its_own_settings(encoder_dir):
    tokenizer = ThreadSafeTokenizer(load_tokenizer(encoder_dir))
    assert tokenize_from_threads(tokenizer) == []
    assert tokenizer.pad_token_id == load_tokenizer(encoder_dir).pad_token_id  # the rest delegated


def test_thread_safe_tokenizer_lets_one_call_in_at_a_time():
    inside, most = [0], [0]

    def slow_tokenizer(text):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.005)
        inside[0] -= 1
        return {"input_ids": [len(text)]}

    tokenizer = ThreadSafeTokenizer(slow_tokenizer)
    workers = [threading.Thread(target=tokenizer, args=("x" * i,)) for i in range(6)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert most[0] == 1 and tokenizer("abc") == {"input_ids": [3]}


def test_tokenize_warns_only_for_sentences_it_cut(encoder_dir, caplog):
    tokenizer = load_tokenizer(encoder_dir)
    sentence, short = CORPUS[3], CORPUS[4]  # the longest and the shortest
    length = len(tokenizer(sentence)["input_ids"])  # with <s> and </s>
    with caplog.at_level(logging.WARNING, logger="instalign_d2.utils.tokenizer"):
        exact = tokenize(tokenizer, [sentence, short], length)
        assert not caplog.records  # a sentence that fills every position exactly is not cut
        cut = tokenize(tokenizer, [short, sentence], length - 1)
    assert len(caplog.records) == 1 and "1 expression(s) longer than" in caplog.text
    assert exact["attention_mask"][0].tolist() == [1] * length
    assert cut["attention_mask"][1].tolist() == [1] * (length - 1)
    assert cut["input_ids"][1, :-1].tolist() == exact["input_ids"][0, : length - 2].tolist()
