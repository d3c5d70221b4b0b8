"""tools/word_swap.py: the swaps, the rewritten sentences, and a run on a tiny model."""

import json

import pytest
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog


def test_swaps_go_both_ways_and_bad_pairs_are_named(load_tool):
    tool = load_tool("word_swap")
    assert tool.parse_swaps(["leftmost=rightmost", "topmost=bottommost"]) == {
        "leftmost": "rightmost",
        "rightmost": "leftmost",
        "topmost": "bottommost",
        "bottommost": "topmost",
    }
    for bad, named in (("leftmost", "two single words"), ("a=a", "itself"), ("a b=c", "two")):
        with pytest.raises(ValueError, match=named):
            tool.parse_swaps([bad])
    with pytest.raises(ValueError, match="already swapped"):
        tool.parse_swaps(["left=right", "left=up"])


def test_the_first_whole_word_is_swapped(load_tool):
    tool = load_tool("word_swap")
    swaps = tool.parse_swaps(["leftmost=rightmost", "red=blue"])
    assert tool.swap_first_word("the leftmost red circle", swaps) == (
        "leftmost",
        "the rightmost red circle",
    )
    assert tool.swap_first_word("the red circle left of the blue one", swaps) == (
        "red",
        "the blue circle left of the blue one",
    )
    assert tool.swap_first_word("the reddish leftmosts", swaps) is None  # whole words only
    assert tool.first_difference(torch.tensor([0, 5, 7, 2]), torch.tensor([0, 5, 8, 2])) == 2
    assert tool.first_difference(torch.tensor([0, 5]), torch.tensor([0, 5])) == -1


def test_run_on_a_tiny_model(load_tool, tmp_path, tiny_checkpoint, capsys):
    tool = load_tool("word_swap")
    cfg, model = tiny_checkpoint.cfg, tiny_checkpoint.model
    out = tmp_path / "swap.json"
    # Every generated expression starts with "the" (or "all"/"both"): swap it for "all".
    argv = ["--config-file", tiny_checkpoint.config, "--weights", tiny_checkpoint.weights]
    argv += ["--swap", "the=all"]
    assert tool.main(argv + ["--json", str(out)]) == 0
    result = json.loads(out.read_text())
    targets = [d for d in DatasetCatalog.get("synthetic_gres_val") if not d["empty"]]
    with_word = [d for d in targets if tool.swap_first_word(d["sentence"]["raw"], result["swaps"])]
    assert with_word and result[tool.TOTAL]["expressions"] == len(with_word)
    assert sum(result[w]["expressions"] for w in ("the", "all") if w in result) == len(with_word)
    for measure in ("answer", "swapped", "agreement"):
        assert 0.0 <= result[tool.TOTAL][measure] <= 100.0
    assert 0.0 <= result[tool.TOTAL]["max |dp|"] <= 1.0

    # "word cos", recomputed here from the text encoder of the saved model for one expression
    first = with_word[0]["sentence"]["raw"]
    word, swapped = tool.swap_first_word(first, result["swaps"])
    with torch.no_grad():
        encoded = model.text_encoder.tokenize([first, swapped])
        text, _ = model.text_encoder(encoded["input_ids"], encoded["attention_mask"])
        text = model.transformer_decoder.text_proj(text)
    at = tool.first_difference(encoded["input_ids"][0], encoded["input_ids"][1])
    expected = float(F.cosine_similarity(text[0, at], text[1, at], dim=0))
    single = tool.measure(
        model,
        tool.GRESDatasetMapper(cfg, is_train=False),
        [with_word[0]],
        result["swaps"],
    )
    assert single[word]["word cos"] == pytest.approx(expected, abs=1e-5)
    assert single[word]["expressions"] == 1
    assert "agreement IoU %" in capsys.readouterr().out

    assert tool.main(argv[:2] + ["--weights", str(tmp_path / "no.pth")]) == 2
    assert tool.main(argv[:4] + ["--swap", "the"]) == 2
    assert tool.main(argv[:4] + ["--swap", "zebra=okapi"]) == 1
