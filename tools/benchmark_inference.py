#!/usr/bin/env python
"""Expressions per second of InstAlign inference: one forward per expression, against the
expressions of each image decoded together after one visual pass (what evaluation and the demo do).

    python tools/benchmark_inference.py                       # tiny and paper configs
    python tools/benchmark_inference.py --config-file configs/grefcoco/instalign_swin_base.yaml \\
        --expressions-per-image 14 --images 2 --repeats 3

Both ways run in one process on the same random-weight model and inputs (``INPUT.IMAGE_SIZE``²
images, ``--expressions-per-image`` tokenised expressions each; gRefCOCO has about 14), after a
warm-up; the table gives the median over ``--repeats`` runs, and the largest difference between
the two ways' answers (they must agree to float tolerance). Models are built as tools/analyze_model.py builds them (random init; a
RoBERTa-base-sized text encoder is generated when the config's directory is absent).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List

import torch
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from analyze_model import setup_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIGS = [
    os.path.join(REPO, "configs", "synthetic", "instalign_tiny.yaml"),
    os.path.join(REPO, "configs", "grefcoco", "instalign_swin_base.yaml"),
]
WORDS = "the left right big small red blue green person dog car and all both two man woman on with".split()


def known_words(tokenizer) -> List[str]:
    """The words of WORDS that the tokenizer keeps whole (a small synthetic vocabulary would split
    "person" into bytes and push expressions past MAX_TOKENS); all of them if too few are."""
    whole = [w for w in WORDS if len(tokenizer.tokenize(" " + w)) == 1]
    return whole if len(whole) >= 5 else WORDS


def make_inputs(model, size: int, images: int, per_image: int, seed: int = 0) -> List[List[Dict]]:
    g = torch.Generator().manual_seed(seed)
    words = known_words(model.text_encoder.tokenizer)
    groups = []
    for i in range(images):
        image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)
        sentences = [
            " ".join(
                words[j]
                for j in torch.randint(
                    0, len(words), (int(torch.randint(2, 9, (1,), generator=g)),), generator=g
                )
            )
            for _ in range(per_image)
        ]
        tokens = model.text_encoder.tokenize(sentences)
        groups.append(
            [
                {
                    "image": image,
                    "height": size,
                    "width": size,
                    "file_name": f"image_{i}.jpg",
                    "input_ids": tokens["input_ids"][k],
                    "attention_mask": tokens["attention_mask"][k],
                }
                for k in range(per_image)
            ]
        )
    return groups


@torch.no_grad()
def time_way(model, groups, grouped: bool, repeats: int):
    def once():
        outputs = []
        for group in groups:
            if grouped:
                outputs.extend(model(group))
            else:
                outputs.extend(model([x])[0] for x in group)
        return outputs

    model(groups[0][:1])  # warm-up (allocator, kernels)
    seconds, outputs = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        outputs = once()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), outputs


def benchmark(config_file: str, args) -> List:
    with tempfile.TemporaryDirectory() as scratch:
        cfg = setup_cfg(
            argparse.Namespace(config_file=config_file, opts=args.opts, device=args.device), scratch
        )
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        groups = make_inputs(model, cfg.INPUT.IMAGE_SIZE, args.images, args.expressions_per_image)
        n = args.images * args.expressions_per_image
        single_s, single_out = time_way(model, groups, grouped=False, repeats=args.repeats)
        grouped_s, grouped_out = time_way(model, groups, grouped=True, repeats=args.repeats)
    worst = max(
        float((a["ref_seg"] - b["ref_seg"]).abs().max()) for a, b in zip(single_out, grouped_out)
    )
    name = os.path.relpath(config_file, REPO)
    return [
        [name, "one forward per expression", f"{n / single_s:.2f}", "1.0x", ""],
        [
            name,
            f"{args.expressions_per_image} expressions per visual pass",
            f"{n / grouped_s:.2f}",
            f"{single_s / grouped_s:.1f}x",
            f"{worst:.1e}",
        ],
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config-file", action="append", help="repeat for several; default: tiny and paper configs"
    )
    parser.add_argument("--expressions-per-image", type=int, default=14)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[])
    args = parser.parse_args(argv)
    rows = []
    for config_file in args.config_file or DEFAULT_CONFIGS:
        rows.extend(benchmark(config_file, args))
    print(
        f"device: {args.device}, threads: {torch.get_num_threads()}, {args.images} images x {args.expressions_per_image} expressions, median of {args.repeats}"
    )
    print(
        tabulate(
            rows,
            headers=["config", "inference", "expressions/s", "speed-up", "max |diff| of ref_seg"],
            tablefmt="github",
        )
    )
    return rows


if __name__ == "__main__":
    main()
