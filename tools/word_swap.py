#!/usr/bin/env python
"""Does a trained model read a word? Swap it for its counterpart and see what changes.

    python tools/word_swap.py --config-file output/synthetic/instalign_tiny/config.yaml \\
        --weights output/synthetic/instalign_tiny/model_final.pth \\
        [--dataset synthetic_gres_val] [--template spatial] [--swap leftmost=rightmost ...]

For every target expression that contains one of the swapped words (as a whole word; by default
the four spatial words, "leftmost" with "rightmost" and "topmost" with "bottommost"), the model
answers the expression as it is and with that word replaced by its counterpart, on the same
image. Per word, the means of:

  answer      IoU of the merged mask (Eq. 8, before the no-target decision) with the ground truth
  swapped     the same for the swapped expression: a model that reads the word loses the truth
  agreement   IoU of the two answers: near 100 means the word changes nothing
  max |dp|    the largest change of a query's relevance score p between the two
  word cos    cosine of the word's feature and its counterpart's at the decoder's input (T0,
              projected; the first token where the two expressions differ): near 1 means the
              text encoder has made the two words one

``agreement`` near 100 with ``swapped`` near ``answer`` says the model answers without the word;
``word cos`` near 1 says where it was lost: in the text encoder already. ``--json`` also writes the
numbers.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from analyze_instances import (  # noqa: E402
    binary_masks_at_input,
    load_trained_model,
    mask_iou,
)
from detectron2.data import DatasetCatalog  # noqa: E402

from instalign_d2.data.dataset_mapper import GRESDatasetMapper  # noqa: E402
from instalign_d2.utils.atomic_io import atomic_write_json  # noqa: E402

DEFAULT_SWAPS = ("leftmost=rightmost", "topmost=bottommost")
TOTAL = "all words"  # the row over every swapped word (a name no single word can have)
MEASURES = ("answer", "swapped", "agreement", "max |dp|", "word cos")


def parse_swaps(pairs: Sequence[str]) -> Dict[str, str]:
    """``["a=b", ...]`` -> ``{"a": "b", "b": "a", ...}`` (each pair swaps both ways)."""
    swaps: Dict[str, str] = {}
    for pair in pairs:
        words = pair.split("=")
        if len(words) != 2 or not all(re.fullmatch(r"[\w'-]+", w) for w in words):
            raise ValueError(
                f"--swap {pair!r}: expected two single words joined by '=', e.g. leftmost=rightmost"
            )
        a, b = words
        if a == b:
            raise ValueError(f"--swap {pair!r}: a word swapped for itself changes nothing")
        for word, counterpart in ((a, b), (b, a)):
            if swaps.get(word, counterpart) != counterpart:
                raise ValueError(
                    f"--swap {pair!r}: {word!r} is already swapped for {swaps[word]!r}"
                )
            swaps[word] = counterpart
    return swaps


def swap_first_word(sentence: str, swaps: Mapping[str, str]) -> Optional[Tuple[str, str]]:
    """``(word, sentence with its first swappable word replaced)``, or None when it has none.

    Whole words only ("leftmost" is not found in "leftmosts"), case as written.
    """
    for match in re.finditer(r"[\w'-]+", sentence):
        word = match.group(0)
        if word in swaps:
            swapped = sentence[: match.start()] + swaps[word] + sentence[match.end() :]
            return word, swapped
    return None


def first_difference(a: torch.Tensor, b: torch.Tensor) -> int:
    """Index of the first position where two ``(L,)`` token id rows differ (-1: none)."""
    differs = (a != b).nonzero()
    return int(differs[0]) if len(differs) else -1


@torch.no_grad()
def measure(
    model, mapper, dataset_dicts, swaps: Mapping[str, str], template: str = ""
) -> Dict[str, Dict[str, float]]:
    """``{word: {measure: mean, "expressions": n}}`` and the row :data:`TOTAL` (IoUs in %)."""
    values = collections.defaultdict(lambda: collections.defaultdict(list))
    for record in dataset_dicts:
        if record.get("empty"):
            continue
        if template and record.get("expression_template") != template:
            continue
        sentence = record["sentence"]
        raw = sentence["raw"] if isinstance(sentence, dict) else sentence
        found = swap_first_word(raw, swaps)
        if found is None:
            continue
        word, swapped_text = found
        swapped = dict(
            record,  # the mapper leaves its input as it is: a shallow copy is enough
            sentence=(
                dict(sentence, raw=swapped_text, sent=swapped_text)
                if isinstance(sentence, dict)
                else swapped_text
            ),
        )
        batch = [mapper(record), mapper(swapped)]
        outputs, visual, _ = model.compute_outputs(batch)  # one image: one visual pass
        final = outputs["predictions"][-1]
        size = visual.image_sizes[0]
        truth = batch[0]["gt_mask_merged"].bool()
        answers = binary_masks_at_input(final["merged_logits"], visual.padded_size, size)
        scores = final["relevance_logits"].sigmoid()
        position = first_difference(batch[0]["input_ids"], batch[1]["input_ids"])
        text = outputs["predictions"][0]["text"]  # T0 at the decoder's width
        for key in (word, TOTAL):
            v = values[key]
            v["answer"].append(100.0 * mask_iou(answers[0], truth))
            v["swapped"].append(100.0 * mask_iou(answers[1], truth))
            v["agreement"].append(100.0 * mask_iou(answers[0], answers[1]))
            v["max |dp|"].append(float((scores[0] - scores[1]).abs().max()))
            if position >= 0:
                v["word cos"].append(
                    float(F.cosine_similarity(text[0, position], text[1, position], dim=0))
                )
    return {
        key: {
            **{m: float(np.mean(v[m])) if v[m] else float("nan") for m in MEASURES},
            "expressions": len(v["answer"]),
        }
        for key, v in values.items()
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", required=True, help="the checkpoint to probe")
    parser.add_argument(
        "--dataset", default="", help="a registered split (default: DATASETS.TEST[0])"
    )
    parser.add_argument(
        "--template", default="", help="only expressions of this template (default: all)"
    )
    parser.add_argument(
        "--swap",
        action="append",
        default=None,
        metavar="WORD=COUNTERPART",
        help=f"a pair of words to swap both ways; repeatable (default: {' '.join(DEFAULT_SWAPS)})",
    )
    parser.add_argument("--json", help="also write the numbers to this file")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[])
    args = parser.parse_args(argv)

    try:
        swaps = parse_swaps(args.swap or DEFAULT_SWAPS)
    except ValueError as error:
        print(f"word_swap: error: {error}", file=sys.stderr)
        return 2
    if not os.path.isfile(args.weights):
        print(f"word_swap: error: --weights {args.weights} not found", file=sys.stderr)
        return 2
    cfg, model = load_trained_model(args.config_file, args.weights, args.opts)
    dataset = args.dataset or cfg.DATASETS.TEST[0]
    result = measure(
        model,
        GRESDatasetMapper(cfg, is_train=False),
        DatasetCatalog.get(dataset),
        swaps,
        args.template,
    )
    if not result:
        print(
            f"word_swap: no target expression of {dataset}"
            + (f" (template {args.template!r})" if args.template else "")
            + f" contains any of {sorted(swaps)}",
            file=sys.stderr,
        )
        return 1
    words = sorted(k for k in result if k != TOTAL) + [TOTAL]
    print(f"answers with each word and with its counterpart, {dataset}, weights: {args.weights}")
    print(
        tabulate(
            [
                [w, f"{w} -> {swaps[w]}" if w in swaps else "", result[w]["expressions"]]
                + [
                    (
                        f"{result[w][m]:.3f}"
                        if m in ("max |dp|", "word cos")
                        else f"{result[w][m]:.1f}"
                    )
                    for m in MEASURES
                ]
                for w in words
            ],
            headers=["word", "swap", "expressions", "answer IoU %", "swapped IoU %"]
            + ["agreement IoU %", "max |dp|", "word cos"],
            tablefmt="github",
        )
    )
    if args.json:
        atomic_write_json(
            args.json,
            {"weights": args.weights, "dataset": dataset, "swaps": swaps, **result},
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
