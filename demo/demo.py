#!/usr/bin/env python
"""InstAlign demo: segment what expressions refer to in images, and show why.

    python demo/demo.py --config-file configs/synthetic/instalign_tiny.yaml \\
        --input photo.jpg more/*.png --text "the red circle" --text "all triangles" \\
        --output demo_out --opts MODEL.WEIGHTS output/synthetic/instalign_tiny/model_final.pth

For every image and expression it writes ``<image>__<k>.png``: the merged mask over the image
(or "NO TARGET"), the top instances in distinct colours with their scores, and the expression
with the words each instance aligns with highlighted in its colour (the paper's Fig. 6). Per
image, ``<image>.json`` holds the expressions, no-target probabilities, merged and instance masks
as COCO RLE, scores and aligned words. A bad image or expression is reported in one line and
skipped; the others are still written, and the exit status is 1.
"""

from __future__ import annotations

import warnings

# detectron2 decorates a few functions with torch.jit.script, which torch 2.14 deprecates; the
# warning says nothing to our users.
warnings.filterwarnings(
    "ignore", message="`torch.jit.script` is deprecated", category=FutureWarning
)

import argparse
import glob
import logging
import os
import sys
from typing import List

import tqdm
from detectron2.utils.logger import setup_logger

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from predictor import BadInputError, GRESPredictor, build_config, image_record  # noqa: E402

import instalign_d2  # noqa: E402,F401  (registers the model)
from instalign_d2.data.image_io import read_image_uint8  # noqa: E402
from instalign_d2.engine import ConfigError  # noqa: E402
from instalign_d2.utils.atomic_io import atomic_write_json, atomic_write_path  # noqa: E402

logger = logging.getLogger("instalign_d2.demo")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="InstAlign demo on image + text pairs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--input", nargs="+", required=True, help="image files or glob patterns")
    parser.add_argument(
        "--text", action="append", required=True, help="a referring expression (repeat for several)"
    )
    parser.add_argument("--output", required=True, help="folder for the PNGs and JSON files")
    parser.add_argument("--max-instances", type=int, default=3, help="instances drawn per answer")
    parser.add_argument(
        "--opts", nargs=argparse.REMAINDER, default=[], help="config overrides, KEY VALUE pairs"
    )
    return parser


def setup_cfg(args):
    return build_config(args.config_file, args.opts)


def expand_inputs(patterns: List[str]) -> List[str]:
    """Globs expanded; a pattern that matches nothing is kept, so it is reported as missing."""
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        paths.extend(matches if matches else [pattern])
    return paths


def report(message: str) -> None:
    """One line on stderr that does not tear the progress bar."""
    tqdm.tqdm.write(f"demo: error: {message}", file=sys.stderr)


def run(args) -> int:
    cfg = setup_cfg(args)
    predictor = GRESPredictor(cfg, cache_size=0)  # each image is answered once
    os.makedirs(args.output, exist_ok=True)
    expressions = []
    failures = 0
    for k, text in enumerate(args.text):
        try:
            expressions.extend(GRESPredictor.check_expressions([text]))
        except BadInputError as exc:
            report(f"--text #{k + 1}: {str(exc).replace('expression 1', 'the expression')}")
            failures += 1
    if not expressions:
        return 1

    used_stems = set()
    for path in tqdm.tqdm(expand_inputs(args.input), desc="images", unit="img", file=sys.stderr):
        stem = base = os.path.splitext(os.path.basename(path))[0]
        for n in range(2, 10**6):  # a/x.png and b/x.png must not overwrite each other
            if stem not in used_stems:
                break
            stem = f"{base}_{n}"
        used_stems.add(stem)
        try:
            image_bgr = read_image_uint8(path, "BGR")
            outputs = predictor(image_bgr, expressions)
        except FileNotFoundError:
            report(f"{path}: no such file")
            failures += 1
            continue
        except (OSError, ValueError, SyntaxError) as exc:  # unreadable file, BadInputError
            reason = (
                str(exc)
                if isinstance(exc, BadInputError)
                else f"not a readable image ({type(exc).__name__}: {exc})"
            )
            report(f"{path}: {reason}")
            failures += 1
            continue
        image_rgb = image_bgr[:, :, ::-1]
        for k, output in enumerate(outputs):
            picture = predictor.draw(image_rgb, output, max_instances=args.max_instances)
            atomic_write_path(
                os.path.join(args.output, f"{stem}__{k}.png"),
                lambda tmp: picture.save(tmp, format="PNG"),
            )
        atomic_write_json(
            os.path.join(args.output, f"{stem}.json"),
            image_record(path, image_bgr, outputs),
            indent=1,
        )
    return 1 if failures else 0


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    setup_logger(name="instalign_d2")
    try:
        return run(args)
    except ConfigError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
