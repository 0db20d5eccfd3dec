"""MNIST's images and labels, the source of N-MNIST, from its four IDX files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ...errors import DataFileError
from ..formats.mnist_idx import read_idx

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def load_mnist(root: str | os.PathLike, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of MNIST's ``split`` from the IDX files in ``root``."""
    images_name, labels_name = FILES[split]
    images = read_idx(Path(root) / images_name)
    labels = read_idx(Path(root) / labels_name).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataFileError(root, f"its {split} images {images.shape} and labels {labels.shape} do not match")
    return images, labels
