"""Training-loop helpers that Detectron2's DefaultTrainer needs on CPU-only machines."""

from .checkpoint import AtomicCheckpointer  # noqa: F401
from .checks import ConfigError, check_config, check_config_file  # noqa: F401
from .ddp import create_ddp_model, finish_distributed  # noqa: F401
