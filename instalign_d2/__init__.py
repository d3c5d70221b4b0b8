"""InstAlign for Detectron2: instance-aware generalized referring expression segmentation.

Importing this package registers the meta-architecture ``InstAlign``, its backbone, pixel
decoder and query decoders, and the GRES datasets (gRefCOCO, Ref-ZOM, RefCOCO family, synthetic).
"""

from . import (
    data,  # noqa: F401,E402  (dataset registration)
    instalign_model,  # noqa: F401,E402  (META_ARCH "InstAlign")
    modeling,  # noqa: F401,E402  (backbone, pixel decoder, decoders)
)
from .config import add_instalign_config  # noqa: F401
from .evaluation import GRESEvaluator  # noqa: F401,E402

__version__ = "0.1.0"
