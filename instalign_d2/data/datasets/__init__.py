"""GRES datasets: loaders of the published formats and the registration of every split."""

from . import builtin  # noqa: F401  (registers every dataset name)
from .errors import DatasetError  # noqa: F401
from .grefcoco import load_grefcoco_json  # noqa: F401
from .refcoco import load_refcoco  # noqa: F401
from .refer_common import DatasetLayoutError  # noqa: F401
from .refzom import load_refzom  # noqa: F401
from .synthetic import load_synthetic_gres  # noqa: F401
