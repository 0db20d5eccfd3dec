"""The embedded motion dataset: eight classes of textures in motion, made in-process in seconds
(``synthetic.motion`` makes the recordings; docs/decolle.md says why they are made so)."""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from ..synthetic import motion
from ..synthetic.motion import MOTION_CLASSES, SENSOR_SIZE, MotionSpec, make_motion_dataset
from ..transforms import ToFrame
from .base import EventDataset, check_split


class MotionDataset(EventDataset):
    """The embedded motion dataset: ``dataset[i] -> (transform(events), label)``, ``n`` recordings
    of ``spec.timesteps`` ms made when it is created.

    Unlike the recorded datasets, it bins the events by default, into the (T, 2, 32, 32) float32
    count frames of 1 ms that the recordings are made for; ``events(i)`` gives the raw events.
    Train and test splits use different seeds, so no texture is shared between them.
    """

    classes = MOTION_CLASSES
    sensor_size = SENSOR_SIZE

    def __init__(
        self,
        split: str = "train",
        n: int = 800,
        seed: int = 1234,
        spec: MotionSpec = MotionSpec(),
        transform: Callable | None = None,
        target_transform: Callable | None = None,
    ) -> None:
        if transform is None:
            transform = ToFrame(SENSOR_SIZE, dt_us=1000, n_bins=spec.timesteps)
        super().__init__(transform, target_transform)
        self.split = check_split(split)
        self.spec = spec
        self.recording_seed = seed * 2 + (split == "test")
        self.recordings, self.targets = make_motion_dataset(n, self.recording_seed, spec)

    def events(self, i: int) -> np.ndarray:
        return self.recordings[i]

    def source(self, i: int) -> tuple[str, object]:
        # Made, not read: the module that makes the recordings, and what it made this one from.
        return motion.__file__, {
            "generated": "motion", "seed": self.recording_seed, "n": len(self.recordings), "index": int(i),
            "spec": dataclasses.asdict(self.spec),
        }
