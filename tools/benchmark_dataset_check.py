#!/usr/bin/env python
"""Time the dataset checks that run each time a split loads, at gRefCOCO's size.

Builds a fake image folder of ``--images`` files (gRefCOCO train: ~20k images) in a temporary
directory, and fake refs and instances of that size, then times, as the median of ``--repeats``
runs:

- the image-presence check as the loaders do it (one ``os.scandir`` of the folder, a set lookup
  per image), beside a ``stat`` per image (``os.path.exists``) for comparison;
- the shape checks of the refs (keys of every ref and sentence, the family of the refs);
- the shape checks of ``instances.json`` (keys of every image and annotation).

    python tools/benchmark_dataset_check.py                  # 20k images, 70k refs, 7 runs
    python tools/benchmark_dataset_check.py --images 2000 --repeats 3

The file system's cache is warm after the first run (no root rights to drop it), so a cold
network file system makes the per-image ``stat`` column much slower still, not the listing.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Callable, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from instalign_d2.data.datasets.image_presence import ImageFolders  # noqa: E402
from instalign_d2.data.datasets.validation import (  # noqa: E402
    check_instances,
    check_ref_format,
    check_refs,
)

LAYOUT = "  images/\n    train2014/"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def fake_refs(num_refs: int, num_images: int) -> List[dict]:
    """gRefCOCO-shaped refs: three sentences each, one in ten without a target."""
    refs = []
    for i in range(num_refs):
        no_target = i % 10 == 0
        refs.append(
            {
                "ref_id": i,
                "image_id": i % num_images,
                "split": "train",
                "ann_id": [-1] if no_target else [i, i + 1],
                "category_id": [-1] if no_target else [1, 1],
                "no_target": no_target,
                "sentences": [
                    {"sent_id": 3 * i + k, "raw": "the man on the left", "sent": "the man"}
                    for k in range(3)
                ],
            }
        )
    return refs


def fake_instances(num_images: int, num_annotations: int) -> dict:
    images = [
        {"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "height": 480, "width": 640}
        for i in range(num_images)
    ]
    annotations = [
        {"id": i, "image_id": i % num_images, "category_id": 1, "bbox": [0, 0, 1, 1]}
        for i in range(num_annotations)
    ]
    return {"images": images, "annotations": annotations}


def timed(fn: Callable[[], object], repeats: int) -> List[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20000, help="images in the fake folder")
    parser.add_argument("--refs", type=int, default=70000, help="refs (3 sentences each)")
    parser.add_argument("--annotations", type=int, default=50000, help="annotations")
    parser.add_argument("--repeats", type=int, default=7, help="runs per check (median shown)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "images", "train2014")
        os.makedirs(folder)
        paths = []
        for i in range(args.images):
            path = os.path.join(folder, f"COCO_train2014_{i:012d}.jpg")
            with open(path, "wb"):
                pass
            paths.append(path)
        # a split names a few images that are not there
        wanted = set(paths[: args.images - 10]) | {os.path.join(folder, "absent.jpg")}
        refs = fake_refs(args.refs, args.images)
        instances = fake_instances(args.images, args.annotations)

        def listing():
            missing = ImageFolders((folder,), LAYOUT).missing(wanted, "benchmark")
            assert len(missing) == 1

        def stat_each():
            missing = [p for p in wanted if not os.path.exists(p)]
            assert len(missing) == 1

        def refs_check():
            check_ref_format(check_refs(refs, "refs.json"), "refs.json", "grefcoco")

        rows = [
            ("images present: 1 scandir + set lookups", len(wanted), timed(listing, args.repeats)),
            ("images present: os.path.exists each", len(wanted), timed(stat_each, args.repeats)),
            ("refs: keys and family", args.refs, timed(refs_check, args.repeats)),
            (
                "instances: keys of images and annotations",
                args.images + args.annotations,
                timed(lambda: check_instances(instances, "instances.json"), args.repeats),
            ),
        ]

    print(
        f"CPU: {cpu_model()} ({os.cpu_count()} logical cores); Python {platform.python_version()}"
    )
    print(f"median of {args.repeats} runs (warm file-system cache)\n")
    header = f"| {'check':<44} | {'items':>7} | {'median ms':>9} | {'min ms':>7} | {'max ms':>7} |"
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    for name, items, times in rows:
        ms = [1000 * t for t in times]
        print(
            f"| {name:<44} | {items:>7} | {statistics.median(ms):>9.1f} | {min(ms):>7.1f} | "
            f"{max(ms):>7.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
