"""GRES data: dataset loaders and registration, GT masks, the mapper.

Importing this package registers every dataset name (see ``datasets/builtin.py``).
"""

from . import datasets  # noqa: F401  (registers the datasets)
from .dataset_mapper import GRESDatasetMapper  # noqa: F401
from .masks import instance_masks, merged_mask, resize_masks_nearest  # noqa: F401
