"""Recordings given one by one, without labels: what ``threefactor predict`` reads."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..formats.event_file import read_events
from .base import EventDataset

UNLABELLED = -1


class EventFiles(EventDataset):
    """The event files ``paths`` (any format ``read_events`` reads, by suffix) on a sensor of
    ``sensor_size`` (W, H, P); every target is ``UNLABELLED``. Events off the sensor are refused
    naming the file, or dropped with ``outside_sensor="drop"``."""

    def __init__(self, paths: Sequence[str | os.PathLike], sensor_size: tuple[int, int, int],
                 transform: Callable | None = None, outside_sensor: str = "error",
                 npy_columns: str = "xytp", npy_time_scale_us: float = 1.0) -> None:
        super().__init__(transform, None, outside_sensor)
        self.paths = [Path(p) for p in paths]
        self.sensor_size = tuple(int(v) for v in sensor_size)
        self.targets = np.full(len(self.paths), UNLABELLED, dtype=np.int64)
        self.npy_columns, self.npy_time_scale_us = npy_columns, npy_time_scale_us

    def events(self, i: int) -> np.ndarray:
        return read_events(self.paths[i], self.npy_columns, self.npy_time_scale_us)

    def source(self, i: int) -> tuple[str, None]:
        return str(self.paths[i]), None
