"""Fixtures of the data-layer tests: the real-data folders, skipped with a reason when absent."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_helpers import SHARED_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "nmnist-small").is_dir():
        pytest.skip(f"real recordings not found at {SHARED_DATA} (the project's ../shared/data)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def mnist_dir(shared_data: Path) -> Path:
    d = shared_data / "mnist"
    if not (d / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST IDX files not found in {d}")
    return d
