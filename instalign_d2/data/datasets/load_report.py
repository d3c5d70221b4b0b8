"""What loading a split found: how many refs it kept, why it skipped the others, which images
are missing. Detectron2's ``DatasetCatalog`` returns only the dataset dicts, so each load
publishes its report here under the dataset's name, for the checks that run before training
(``instalign_d2/data/checked.py``) to read.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

# Why a ref was left out, in the words of the messages (keys: the loaders' skip reasons).
REF_SKIP_REASONS = {
    "image_not_in_instances": "its image is not in instances.json",
    "missing_annotation": "its annotation is not in instances.json",
    "crowd_annotation": "crowd-only targets",
    "no_valid_polygon": "no valid polygon",
    "missing_segmentation": "no segmentation",
    "undecodable_segmentation": "an undecodable segmentation",
    "zero_area_mask": "an empty mask",
    "annotation_of_another_image": "its annotation belongs to another image",
    "no_usable_target": "no usable target (mixed reasons)",
    "no_sentence": "no sentence",
    "image_missing": "its image file is missing",
}
EXAMPLES_IN_MESSAGE = 3


@dataclass
class LoadReport:
    """The counts of one load of one split."""

    dataset_name: str
    split: str
    refs_file: str = ""
    refs_in_split: int = 0
    refs_kept: int = 0
    expressions: int = 0
    refs_skipped: Counter = field(default_factory=Counter)
    splits_in_file: Counter = field(default_factory=Counter)
    images: int = 0  # distinct images of the kept refs
    missing_images: List[str] = field(default_factory=list)
    image_folders: Tuple[str, ...] = ()

    @property
    def missing_fraction(self) -> float:
        return len(self.missing_images) / self.images if self.images else 0.0

    def missing_examples(self) -> str:
        return ", ".join(os.path.basename(p) for p in self.missing_images[:EXAMPLES_IN_MESSAGE])

    def why_nothing_usable(self) -> str:
        """Why the split has no usable expression, with the counts."""
        source = f" of {self.refs_file}" if self.refs_file else ""
        if not self.refs_in_split:
            splits = ", ".join(f"{s} ({n})" for s, n in sorted(self.splits_in_file.items()))
            return (
                f"the refs file{source} has no ref of split {self.split!r} (its splits: "
                f"{splits or 'none'}); use a dataset name of one of those splits"
            )
        reasons = ", ".join(
            f"{n} for {REF_SKIP_REASONS.get(reason, reason)}"
            for reason, n in self.refs_skipped.most_common()
        )
        n = self.refs_in_split
        refs = "the only ref" if n == 1 else f"all {n} refs"
        return (
            f"{refs} of split {self.split!r}{source} {'was' if n == 1 else 'were'} skipped: "
            f"{reasons}; check that instances.json and the images belong to this refs file"
        )


_REPORTS: Dict[str, LoadReport] = {}


def publish(report: LoadReport) -> None:
    _REPORTS[report.dataset_name] = report


def report_of(dataset_name: str) -> Optional[LoadReport]:
    """The report of the last load of ``dataset_name`` in this process (None if none)."""
    return _REPORTS.get(dataset_name)


def forget(dataset_name: str) -> None:
    _REPORTS.pop(dataset_name, None)
