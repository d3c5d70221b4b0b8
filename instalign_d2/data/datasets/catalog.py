"""Registration of GRES datasets whose root is read when they load, not when they register.

``DatasetCatalog`` stores a loader; ours computes the paths from ``$DETECTRON2_DATASETS`` at call
time, so a change of the variable after ``import instalign_d2`` is honoured. The metadata paths
set at registration (from the root of that moment) are refreshed when the dataset loads.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog

# A loader returns the dataset dicts and the metadata paths it actually used.
Loader = Callable[[], Tuple[List[dict], Dict[str, str]]]

EVALUATOR_TYPES = ("grefcoco", "refzom", "refcoco")


def refresh_metadata(name: str, **values) -> None:
    """Set metadata fields of ``name``, replacing values set before (Detectron2 forbids that)."""
    metadata = MetadataCatalog.get(name)
    for key, value in values.items():
        if hasattr(metadata, key) and getattr(metadata, key) != value:
            delattr(metadata, key)
        metadata.set(**{key: value})


def register_gres_dataset(
    name: str, loader: Loader, *, evaluator_type: str, split: str, **metadata
) -> None:
    """Register ``name`` in Detectron2's catalogs.

    Args:
        name: dataset name (e.g. ``grefcoco_unc_val``).
        loader: returns ``(dataset_dicts, {"dataset_root": ..., "image_root": ...})``.
        evaluator_type: one of ``grefcoco``, ``refzom``, ``refcoco`` (picks the evaluator).
        split: the split the name stands for.
        metadata: more metadata (``dataset_root``, ``image_root`` as known at registration).
    """
    if evaluator_type not in EVALUATOR_TYPES:
        raise ValueError(f"evaluator_type={evaluator_type!r}: expected one of {EVALUATOR_TYPES}")

    def load() -> List[dict]:
        dicts, used_paths = loader()
        refresh_metadata(name, **used_paths)
        return dicts

    if name in DatasetCatalog.list():  # re-import (e.g. importlib.reload): replace, don't fail
        DatasetCatalog.remove(name)
    DatasetCatalog.register(name, load)
    refresh_metadata(name, evaluator_type=evaluator_type, split=split, **metadata)


def register_splits(
    splits: Dict[str, str],
    paths: Callable[[str], Dict[str, str]],
    load: Callable[[Dict[str, str], str, str], List[dict]],
    *,
    evaluator_type: str,
    root: Callable[[], str],
) -> None:
    """Register each ``name -> split`` of one dataset, whose files ``paths(root())`` locates.

    Args:
        splits: dataset name -> split name (e.g. ``{"grefcoco_unc_val": "val"}``).
        paths: datasets root -> that dataset's files; must give ``dataset_root`` and ``image_root``.
        load: ``(paths, split, name)`` -> dataset dicts.
        evaluator_type: picks the evaluator (see :func:`register_gres_dataset`).
        root: returns the datasets root; called when a split loads, so that a change of
            ``$DETECTRON2_DATASETS`` after import is honoured.
    """
    for name, split in splits.items():

        def load_split(split=split, name=name):
            located = paths(root())
            dicts = load(located, split, name)
            return dicts, {key: located[key] for key in ("dataset_root", "image_root")}

        located = paths(root())
        register_gres_dataset(
            name,
            load_split,
            evaluator_type=evaluator_type,
            split=split,
            dataset_root=located["dataset_root"],
            image_root=located["image_root"],
        )
