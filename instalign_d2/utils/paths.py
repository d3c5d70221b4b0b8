"""Where datasets and local model directories live."""

import os

DATASETS_ENV = "DETECTRON2_DATASETS"


def datasets_root() -> str:
    """Root of all datasets: ``$DETECTRON2_DATASETS``, default ``./datasets`` (Detectron2's convention)."""
    return os.path.expanduser(os.environ.get(DATASETS_ENV, "datasets"))


def expand_path(path: str) -> str:
    """Expand ``~`` and ``$DETECTRON2_DATASETS`` (default ``datasets``) in a config path."""
    if not path:
        return path
    path = path.replace("${" + DATASETS_ENV + "}", datasets_root()).replace(
        "$" + DATASETS_ENV, datasets_root()
    )
    return os.path.expanduser(path)
