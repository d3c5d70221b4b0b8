"""The dataset dicts of the splits a run uses, checked before training or evaluation starts.

Loading a split already stops on a malformed file and on a split whose images are all missing
(:mod:`instalign_d2.data.datasets`). Here, with the config at hand, a split also stops when
more than ``DATASETS.MAX_MISSING_IMAGE_FRACTION`` of its images are missing (a broken
download rather than a few bad files) or when none of its expressions is usable; a few
missing images give a warning with the count and share, and their expressions are left out
of training and counted as skipped in evaluation (the test mapper marks them).

``train_net.py`` checks every split before it starts any process (:func:`preload`) and hands
the loaded dicts to the data loaders built next in the same process (:func:`checked_dicts`),
so that a big split is read once, not once to check and once to train. Whatever was not taken
is dropped by :func:`release`: the cache holds dicts only between the check and the loaders.
"""

from __future__ import annotations

import logging
from typing import Dict, Iterable, List, Sequence, Tuple

from detectron2.data import DatasetCatalog

from instalign_d2.data.datasets import load_report
from instalign_d2.data.datasets.errors import DatasetError, error_line
from instalign_d2.utils.paths import datasets_root

logger = logging.getLogger(__name__)

FRACTION_KEY = "DATASETS.MAX_MISSING_IMAGE_FRACTION"

# (dataset name, datasets root) -> the checked dicts, waiting for the loader that uses them.
_handed_over: Dict[Tuple[str, str], List[dict]] = {}


def max_missing_image_fraction(cfg) -> float:
    """``DATASETS.MAX_MISSING_IMAGE_FRACTION``."""
    return float(cfg.DATASETS.MAX_MISSING_IMAGE_FRACTION)


def _key(name: str) -> Tuple[str, str]:
    return name, datasets_root()


def _load(name: str) -> List[dict]:
    load_report.forget(name)
    return DatasetCatalog.get(name)


def check_split(dicts: Sequence[dict], name: str, *, max_missing_fraction: float) -> None:
    """Stop (:class:`DatasetError`) on too many missing images or no usable expression; warn of
    a few missing images. ``dicts`` are those just loaded for ``name``."""
    report = load_report.report_of(name)
    if report is not None and report.missing_images:
        share = report.missing_fraction
        counts = (
            f"{len(report.missing_images)} of its {report.images} images ({100 * share:.1f} %) "
            f"are missing under {', '.join(report.image_folders)} (e.g. {report.missing_examples()})"
        )
        if share > max_missing_fraction:
            raise DatasetError(
                f"{name}: {counts}: more than {FRACTION_KEY}={max_missing_fraction:g}, which means "
                "an incomplete download or extraction rather than a few bad files; download the "
                f"images again (or raise {FRACTION_KEY})"
            )
        affected = sum(1 for d in dicts if d.get("image_missing"))
        logger.warning(
            "%s: %s; their %d expressions are left out of training and counted as skipped in "
            "evaluation",
            name,
            counts,
            affected,
        )
    if any(not d.get("image_missing") for d in dicts):
        return
    if report is not None:
        raise DatasetError(f"{name}: no usable expression: {report.why_nothing_usable()}")
    raise DatasetError(f"{name}: the dataset is empty; check what its loader reads")


def _checked(cfg, name: str) -> List[dict]:
    dicts = _load(name)
    check_split(dicts, name, max_missing_fraction=max_missing_image_fraction(cfg))
    return dicts


def preload(cfg, names: Iterable[str]) -> None:
    """Load and check each split of ``names``; keep the dicts for :func:`checked_dicts`."""
    for name in names:
        if _key(name) not in _handed_over:
            _handed_over[_key(name)] = _checked(cfg, name)


def release() -> None:
    """Drop the dicts no loader took (the run is over, or the loaders run in other processes)."""
    _handed_over.clear()


def checked_dicts(cfg, name: str, *, training: bool, keep: bool = False) -> List[dict]:
    """The checked dicts of ``name``: those :func:`preload` kept, else freshly loaded and checked.

    For training, the expressions of missing images are left out. With ``keep`` the dicts stay
    for the next caller (e.g. counting the samples of an epoch before the loader is built).
    """
    dicts = _handed_over.get(_key(name)) if keep else _handed_over.pop(_key(name), None)
    if dicts is None:
        dicts = _checked(cfg, name)
        if keep:
            _handed_over[_key(name)] = dicts
    if training:
        dicts = [d for d in dicts if not d.get("image_missing")]
    return dicts


def with_key(key: str, name: str, exc: BaseException) -> DatasetError:
    """``exc`` as a :class:`DatasetError` whose line starts with the config key and dataset."""
    line = error_line(exc)
    if line.startswith(f"{name}: "):
        line = line[len(name) + 2 :]
    return DatasetError(f"{key}: {name}: {line}")
