"""GRES datasets: loaders of the published formats, the synthetic generator, registration."""

from . import builtin  # noqa: F401  (registers every dataset name)
from .grefcoco import load_grefcoco_json  # noqa: F401
from .refcoco import load_refcoco  # noqa: F401
from .refer_common import DatasetLayoutError  # noqa: F401
from .refzom import load_refzom  # noqa: F401
from .synthetic import ensure_synthetic_gres, generate_synthetic_gres, synthetic_root  # noqa: F401
