"""Training on images that exist but cannot be decoded (a truncated JPEG, a file of zeros).

The train mapper returns None for such a sample, and Detectron2's ``MapDataset`` then maps a
random other one; it drops a failed index from its candidates and adds it back only when it
maps. Left alone, a set where most images are damaged would spend the run retrying, and one
where all are damaged ends in ``random.sample`` of an empty population. :class:`UnreadableImageGuard`
wraps the mapper: each damaged image is decoded once, skipped at once when drawn again, counted
in a warning, and when more than ``DATASETS.MAX_MISSING_IMAGE_FRACTION`` of the images (or all
of them) are damaged the run stops with :class:`DatasetError`. Every failed draw adds a new
damaged image or skips a known one without decoding, and all images damaged stops the run, so
MapDataset's retries always end.

Each DataLoader worker has its own copy and counts what it draws.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Set

from instalign_d2.data.datasets.errors import DatasetError

logger = logging.getLogger(__name__)

FRACTION_KEY = "DATASETS.MAX_MISSING_IMAGE_FRACTION"
LOGGED_ONE_BY_ONE = 5  # damaged images reported one by one, then every LOG_EVERY-th
LOG_EVERY = 20


class UnreadableImageGuard:
    """The train mapper, with damaged images counted, skipped without retries and capped.

    Args:
        mapper: the per-expression train mapper; None from it means "this image cannot be used"
            (its ``last_skip_reason``, if any, says why).
        num_images: distinct images of the training set.
        max_fraction: the share of damaged images above which the run stops.
    """

    def __init__(
        self, mapper: Callable[[dict], Optional[dict]], num_images: int, max_fraction: float
    ):
        self.mapper = mapper
        self.num_images = int(num_images)
        self.max_fraction = float(max_fraction)
        self.unreadable: Set[str] = set()
        self.skipped_draws = 0

    def __call__(self, dataset_dict: dict) -> Optional[dict]:
        file_name = dataset_dict["file_name"]
        if file_name in self.unreadable:
            self.skipped_draws += 1
            return None
        mapped = self.mapper(dataset_dict)
        if mapped is not None:
            return mapped
        self.skipped_draws += 1
        self.unreadable.add(file_name)
        self._count(file_name)
        return None

    def _count(self, file_name: str) -> None:
        count = len(self.unreadable)
        share = count / max(self.num_images, 1)
        reason = getattr(self.mapper, "last_skip_reason", "") or f"cannot be used: {file_name}"
        if share > self.max_fraction or count >= self.num_images:
            raise DatasetError(
                f"DATASETS.TRAIN: {count} of the {self.num_images} training images cannot be "
                f"decoded ({100 * share:.1f} %, more than {FRACTION_KEY}={self.max_fraction:g}; "
                f"the last: {reason}); replace the damaged files (download the images again) "
                f"or raise {FRACTION_KEY}"
            )
        if count <= LOGGED_ONE_BY_ONE or count % LOG_EVERY == 0:
            logger.warning(
                "training: %d damaged image%s skipped so far (%.2f %% of %d; the run stops above "
                "%g %% = %s); the last: %s",
                count,
                "s" if count != 1 else "",
                100 * share,
                self.num_images,
                100 * self.max_fraction,
                FRACTION_KEY,
                reason,
            )
