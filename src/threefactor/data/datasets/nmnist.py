"""N-MNIST (Orchard et al. 2015): 34 x 34 ATIS recordings of MNIST digits, one ``.bin`` file each."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from ..download import Resource
from ..formats.nmnist_bin import read_bin
from ..sensors import KNOWN_SENSORS
from .base import PublishedDataset, not_found, sorted_files

SENSOR_SIZE = KNOWN_SENSORS["nmnist"]
CLASSES = (
    "0 - zero", "1 - one", "2 - two", "3 - three", "4 - four",
    "5 - five", "6 - six", "7 - seven", "8 - eight", "9 - nine",
)
FIRST_SACCADE_US = 100_000


class NMNIST(PublishedDataset):
    """N-MNIST from ``root/Train/<digit>/<id>.bin`` and ``root/Test/...``, as the archives unpack.

    ``dataset[i] -> (transform(events), label)``; with no transform, the raw events. The format
    holds x and y up to 255: an event off the 34 x 34 sensor is refused (``outside_sensor``).
    ``first_saccade_only`` keeps the events of the first 100 ms.
    """

    classes = CLASSES
    sensor_size = SENSOR_SIZE
    folders = {"train": "Train", "test": "Test"}
    # The official archives (Mendeley Data, as Tonic fetches them) and their md5 sums.
    resources = {
        "train": Resource(
            "https://data.mendeley.com/public-files/datasets/468j46mzdv/files/"
            "39c25547-014b-4137-a934-9d29fa53c7a0/file_downloaded",
            "train.zip", md5="20959b8e626244a1b502305a9e6e2031"),
        "test": Resource(
            "https://data.mendeley.com/public-files/datasets/468j46mzdv/files/"
            "05a4d654-7e03-4c15-bdfa-9bb2bcbea494/file_downloaded",
            "test.zip", md5="69ca8762b2fe404d9b9bad1103e97832"),
    }

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: Callable | None = None,
                 download: bool = False, first_saccade_only: bool = False,
                 target_transform: Callable | None = None, outside_sensor: str = "error") -> None:
        super().__init__(root, split, transform, target_transform, outside_sensor)
        self.first_saccade_only = first_saccade_only
        folder = self.root / self.folders[split]
        files, labels = self._scan(folder)
        if not files and download:
            self.fetch()
            files, labels = self._scan(folder)
        if not files:
            res = self.resources[split]
            raise not_found(
                f"N-MNIST {split} split", f"{folder}/<digit>/*.bin",
                f"pass download=True to fetch {res.url}, or unpack {res.filename} (Train.zip/Test.zip "
                f"of the official N-MNIST) into {self.root}"
            )
        self.files = files
        self.targets = np.asarray(labels, dtype=np.int64)

    @staticmethod
    def _scan(folder: Path) -> tuple[list[Path], list[int]]:
        files: list[Path] = []
        labels: list[int] = []
        for digit in range(10):
            sub = folder / str(digit)
            if sub.is_dir():
                found = sorted_files(sub, ".bin")
                files += found
                labels += [digit] * len(found)
        return files, labels

    def events(self, i: int) -> np.ndarray:
        ev = read_bin(self.files[i])
        if self.first_saccade_only:
            ev = ev[ev["t"] < FIRST_SACCADE_US]
        return ev

    def source(self, i: int) -> tuple[str, object]:
        return str(self.files[i]), {"first_saccade_only": self.first_saccade_only}
