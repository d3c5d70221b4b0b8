"""Shared test fixtures."""
import os
import sys

import pytest
import torch

# Tests use tiny models, where threads gain little; and when anything else runs beside pytest,
# OpenMP threads that spin-wait for a busy core make small ops hundreds of times slower.
torch.set_num_threads(1)

# train_net.py, demo/ and tools/ live at the repository root, outside the package.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for folder in (REPO_ROOT, os.path.join(REPO_ROOT, "demo")):
    if folder not in sys.path:
        sys.path.insert(0, folder)


def pytest_collection_modifyitems(config, items):
    """CUDA tests skip cleanly on machines without a GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
