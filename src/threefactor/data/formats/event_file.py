"""One event file of any format read here, chosen by its suffix: ``.aedat`` (AEDAT 3.1),
``.npy`` (a structured event array or named (N, 4) columns) and ``.bin`` (N-MNIST)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ...errors import EventFileError
from .aedat import read_aedat
from .nmnist_bin import read_bin
from .npy_events import read_npy_events

SUFFIXES = (".aedat", ".npy", ".bin")


def read_events(path: str | os.PathLike, npy_columns: str = "xytp", npy_time_scale_us: float = 1.0) -> np.ndarray:
    """Events of one recording, by its suffix (.aedat, .npy, .bin); ``npy_columns`` and
    ``npy_time_scale_us`` describe a plain (N, 4) ``.npy`` array."""
    suffix = Path(path).suffix.lower()
    if suffix == ".aedat":
        return read_aedat(path)
    if suffix == ".npy":
        return read_npy_events(path, npy_columns, npy_time_scale_us)
    if suffix == ".bin":
        return read_bin(path)
    raise EventFileError(path, f"its suffix {suffix!r} is not one of {', '.join(SUFFIXES)}")
