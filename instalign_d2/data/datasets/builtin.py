"""Register every built-in dataset name at import, as Detectron2's ``builtin.py``.

Paths are computed from ``$DETECTRON2_DATASETS`` (default ``./datasets``) when a dataset loads.
"""

from instalign_d2.data.datasets.grefcoco import register_all_grefcoco
from instalign_d2.data.datasets.refcoco import register_all_refcoco
from instalign_d2.data.datasets.refzom import register_all_refzom
from instalign_d2.data.datasets.synthetic import register_all_synthetic_gres
from instalign_d2.utils.paths import datasets_root


def register_all(root=datasets_root) -> None:
    """Register gRefCOCO, Ref-ZOM, RefCOCO/+/g and the synthetic dataset under ``root()``."""
    register_all_grefcoco(root)
    register_all_refzom(root)
    register_all_refcoco(root)
    register_all_synthetic_gres(root)


register_all()
