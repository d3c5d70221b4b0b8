"""Shared test fixtures."""
import pytest
import torch

# Tests use tiny models, where threads gain little; and when anything else runs beside pytest,
# OpenMP threads that spin-wait for a busy core make small ops hundreds of times slower.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """CUDA tests skip cleanly on machines without a GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
