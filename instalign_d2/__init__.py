"""InstAlign for Detectron2: instance-aware generalized referring expression segmentation.

Importing this package registers the meta-architecture ``InstAlign``, its backbone, pixel
decoder and decoders, and the GRES datasets (gRefCOCO, Ref-ZOM, RefCOCO family, synthetic).
"""
from .config import add_instalign_config  # noqa: F401

__version__ = "0.1.0"
