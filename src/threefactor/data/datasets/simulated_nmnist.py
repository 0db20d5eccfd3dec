"""N-MNIST simulated from MNIST's images: each digit moved along N-MNIST's saccade triangle in
front of the pixel model (``synthetic.saccades``), made on demand, the same on every access."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable

import numpy as np

from ..synthetic.saccades import SaccadeSpec, simulate_saccades
from .base import EventDataset, check_split
from .mnist import FILES, load_mnist
from .nmnist import CLASSES as NMNIST_CLASSES


class SimulatedNMNIST(EventDataset):
    """N-MNIST-like recordings simulated from MNIST's IDX files in ``root_mnist``.

    Sample ``i`` is made from MNIST image ``i`` of ``split`` with a random generator seeded by
    (seed, split, i), so it is the same on every access, in every process. ``n`` keeps the
    first ``n`` images. Sensor (spec.sensor, spec.sensor, 2), by default N-MNIST's (34, 34, 2);
    classes as ``NMNIST``.
    """

    classes = NMNIST_CLASSES

    def __init__(
        self,
        root_mnist: str | os.PathLike,
        split: str = "train",
        n: int | None = None,
        transform: Callable | None = None,
        seed: int = 0,
        spec: SaccadeSpec = SaccadeSpec(),
        target_transform: Callable | None = None,
    ) -> None:
        super().__init__(transform, target_transform)
        self.root = Path(root_mnist)
        self.split = check_split(split)
        self.seed = seed
        self.spec = spec
        self.sensor_size = (spec.sensor, spec.sensor, 2)
        images, labels = load_mnist(self.root, split)
        if n is not None:
            images, labels = images[:n], labels[:n]
        self.images = images
        self.targets = labels

    def events(self, i: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.split == "test", i])
        return simulate_saccades(self.images[i:i + 1], self.spec, rng)[0]

    def source(self, i: int) -> tuple[str, object]:
        return str(self.root / FILES[self.split][0]), {
            "simulated": "saccades", "index": int(i), "seed": self.seed, "spec": dataclasses.asdict(self.spec),
        }
