"""Shared test setup: Triton interpreter when there is no GPU, fixed seeds, GPU marker, data paths."""
import os
import pathlib
import random

import pytest

try:
    import torch
    _HAS_GPU = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard dependency
    _HAS_GPU = False

if not _HAS_GPU:
    # Must be set before any module that defines Triton kernels is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402

DATA_DIR = pathlib.Path(os.environ.get("MBREC_FAST_DATA", pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if _HAS_GPU:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    """Root of ../shared/data; tests that need it skip with a clear message when it is absent."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"real data not found at {DATA_DIR} (set MBREC_FAST_DATA)")
    return DATA_DIR
