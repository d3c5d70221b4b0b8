"""Registration of the synthetic GRES splits ``synthetic_gres_{train,val,test}``.

The set is written in the gRefCOCO layout by :mod:`instalign_d2.synthetic` (``train_net.py`` does
it on first use), so the gRefCOCO loader reads it; its sentences also record their template.
"""

from __future__ import annotations

import os
from typing import Callable, List, Optional

from instalign_d2.data.datasets.catalog import register_splits
from instalign_d2.data.datasets.grefcoco import load_grefcoco_json
from instalign_d2.synthetic.params import (
    SYNTHETIC_DIRNAME,
    SYNTHETIC_LAYOUT,
    SYNTHETIC_SPLITS,
    synthetic_paths,
)


def load_synthetic_gres(root: str, split: str, dataset_name: Optional[str] = None) -> List[dict]:
    """Dataset dicts of one split of a generated dataset in ``root``."""
    paths = synthetic_paths(root)
    return load_grefcoco_json(
        paths["refs_file"],
        paths["instances_file"],
        paths["image_root"],
        split,
        dataset_name=dataset_name or f"synthetic_gres_{split}",
        source="synthetic_gres",
        layout=SYNTHETIC_LAYOUT,
    )


def register_all_synthetic_gres(root: Callable[[], str]) -> None:
    """Register ``synthetic_gres_{train,val,test}`` under ``root()/synthetic_gres`` (read at load)."""
    register_splits(
        {f"synthetic_gres_{split}": split for split in SYNTHETIC_SPLITS},
        lambda datasets_root: synthetic_paths(os.path.join(datasets_root, SYNTHETIC_DIRNAME)),
        lambda paths, split, name: load_synthetic_gres(paths["dataset_root"], split, name),
        evaluator_type="grefcoco",
        root=root,
    )
