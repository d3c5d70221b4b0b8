"""``python -m instalign_d2.synthetic --root DIR [--seed N ...]``: generate the synthetic GRES set."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from instalign_d2.synthetic.generator import (
    ensure_synthetic_gres,
    generate_synthetic_gres,
)
from instalign_d2.synthetic.params import SyntheticParams


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m instalign_d2.synthetic",
        description="Generate the synthetic GRES dataset (gRefCOCO layout).",
    )
    parser.add_argument(
        "--root", default=None, help="output folder (default: $DETECTRON2_DATASETS/synthetic_gres)"
    )
    SyntheticParams.add_arguments(parser)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace a dataset generated earlier in --root, whatever its parameters",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        params = SyntheticParams.from_arguments(args)
        if args.force:
            generate_synthetic_gres(args.root, params, workers=args.workers)
        else:
            ensure_synthetic_gres(args.root, params, workers=args.workers)
    except (ValueError, FileExistsError) as exc:
        print(f"instalign_d2.synthetic: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
