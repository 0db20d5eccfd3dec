"""The Spiking Heidelberg Digits (SHD, Cramer et al. 2020): spoken digits 0-9 in English and
German as spikes of 700 cochlea channels, one HDF5 file per split."""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

from ...errors import EventFileError
from ..download import Resource
from ..formats.shd_hdf5 import SHDFile
from ..sensors import KNOWN_SENSORS
from .base import PublishedDataset, not_found

SENSOR_SIZE = KNOWN_SENSORS["shd"]
CLASSES = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "null", "eins", "zwei", "drei", "vier", "fuenf", "sechs", "sieben", "acht", "neun",
)


class SHD(PublishedDataset):
    """SHD from ``root/shd_train.h5`` or ``root/shd_test.h5``; 20 classes, sensor (700, 1, 1).

    Labels are checked against the classes (``extra/keys`` when the file has them) on opening.
    The file is opened lazily in each process (so DataLoader workers each get their own handle).
    """

    sensor_size = SENSOR_SIZE
    classes = CLASSES
    filenames = {"train": "shd_train.h5", "test": "shd_test.h5"}
    # The official archives (Zenke lab, as Tonic fetches them) and their md5 sums.
    resources = {
        "train": Resource("https://zenkelab.org/datasets/shd_train.h5.zip", "shd_train.h5.zip",
                          md5="f3252aeb598ac776c1b526422d90eecb"),
        "test": Resource("https://zenkelab.org/datasets/shd_test.h5.zip", "shd_test.h5.zip",
                         md5="1503a5064faa34311c398fb0a1ed0a6f"),
    }

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: Callable | None = None,
                 download: bool = False, target_transform: Callable | None = None,
                 outside_sensor: str = "error") -> None:
        super().__init__(root, split, transform, target_transform, outside_sensor)
        self.path = self.root / self.filenames[split]
        if not self.path.is_file() and download:
            self.fetch()
        if not self.path.is_file():
            res = self.resources[split]
            raise not_found(f"SHD {split} split", self.path,
                            f"pass download=True to fetch {res.url}, or unzip {res.filename} into {self.root}")
        with SHDFile(self.path) as f:
            self.targets = f.labels
            if f.keys is not None and len(f.keys) > 0:
                self.classes = f.keys
        if len(self.targets) and self.targets.max() >= len(self.classes):
            i = int(np.argmax(self.targets >= len(self.classes)))
            where = "its extra/keys name" if f.keys else "SHD has"
            raise EventFileError(
                self.path, f"sample {i} has label {int(self.targets[i])}, but {where} only "
                f"{len(self.classes)} classes (labels 0..{len(self.classes) - 1})")
        self._file: SHDFile | None = None
        self._pid: int | None = None

    def _handle(self) -> SHDFile:
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = SHDFile(self.path), os.getpid()
        return self._file

    def events(self, i: int) -> np.ndarray:
        return self._handle().events(i)

    def source(self, i: int) -> tuple[str, object]:
        return str(self.path), {"sample": int(i)}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_file"], state["_pid"] = None, None
        return state
