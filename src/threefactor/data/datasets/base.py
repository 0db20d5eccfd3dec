"""What every event dataset here shares: Tonic's shape plus the hooks the on-disk cache needs.

``dataset[i] -> (transform(events), label)``, with ``classes``, ``sensor_size`` (W, H, P) and
``targets``. Two more methods keep caching honest: ``events(i)`` gives the raw events (no
transform) and ``source(i)`` names where they come from (a file path plus what part of it; for
recordings made here, the module that makes them plus its seed and settings), so a cache can
key on the file's size, mtime and content and never serve data from an older file.

Every sample is checked against ``sensor_size`` as it is read: an event off the sensor is an
``EventFileError`` naming the file and the event (``outside_sensor="drop"`` drops such events
instead, and ``checked_events`` says how many), because counted into frames it would land in
another pixel.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ...errors import DatasetNotFoundError, EventFileError
from ..download import Resource, download_and_extract
from ..events import describe_event, describe_sensor, first_outside_sensor, inside_sensor

SPLITS = ("train", "test")
OUTSIDE_SENSOR = ("error", "drop")  # what to do with an event off the sensor


def check_outside_sensor(choice: str) -> str:
    if choice not in OUTSIDE_SENSOR:
        raise ValueError(f"outside_sensor must be one of {', '.join(map(repr, OUTSIDE_SENSOR))}, got {choice!r}")
    return choice


def check_split(split: str, allowed: Sequence[str] = SPLITS) -> str:
    if split not in allowed:
        raise ValueError(f"split must be one of {', '.join(map(repr, allowed))}, got {split!r}")
    return split


class EventDataset(torch.utils.data.Dataset):
    """Base of the event datasets: subclasses fill ``classes``, ``sensor_size``, ``targets``
    and implement ``__len__``, ``events`` and ``source``."""

    classes: Sequence[str] = ()
    sensor_size: tuple[int, int, int] = (0, 0, 0)
    targets: np.ndarray
    transform: Callable | None = None
    target_transform: Callable | None = None
    outside_sensor: str = "error"  # or "drop": events off the sensor are dropped, not refused

    def __init__(self, transform: Callable | None = None, target_transform: Callable | None = None,
                 outside_sensor: str = "error") -> None:
        self.transform = transform
        self.target_transform = target_transform
        self.outside_sensor = check_outside_sensor(outside_sensor)

    def events(self, i: int) -> np.ndarray:
        """Raw events of sample ``i`` (``EVENT_DTYPE``), before any transform and unchecked."""
        raise NotImplementedError

    def checked_events(self, i: int) -> tuple[np.ndarray, int]:
        """Events of sample ``i`` that lie on ``sensor_size``, and how many were dropped.

        With ``outside_sensor == "error"`` (the default) an event off the sensor is an
        ``EventFileError`` naming the file and the first such event.
        """
        ev = self.events(i)
        bad = first_outside_sensor(ev, self.sensor_size)
        if bad is None:
            return ev, 0
        if self.outside_sensor == "drop":
            kept = ev[inside_sensor(ev, self.sensor_size)]
            return kept, len(ev) - len(kept)
        path, part = self.source(i)
        where = describe_part(part)
        raise EventFileError(
            path, f"{describe_event(ev, bad)}{' of ' + where if where else ''} lies outside the "
            f"{describe_sensor(self.sensor_size)}; to skip such events, set outside_sensor to 'drop' "
            "(data.outside_sensor in a config)")

    def source(self, i: int) -> tuple[str, Any]:
        """(file path, part of the file) that sample ``i`` is read from; the cache stats the path."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} samples")
        i = i % len(self)
        ev, _ = self.checked_events(i)
        x = self.transform(ev) if self.transform is not None else ev
        y = int(self.targets[i])
        if self.target_transform is not None:
            y = self.target_transform(y)
        return x, y


class PublishedDataset(EventDataset):
    """A published dataset: a train and a test split under ``root``, whose archives
    ``resources`` names (``fetch`` downloads and unpacks the split's)."""

    resources: dict[str, Resource]

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: Callable | None = None,
                 target_transform: Callable | None = None, outside_sensor: str = "error") -> None:
        super().__init__(transform, target_transform, outside_sensor)
        self.root = Path(root)
        self.split = check_split(split)

    def fetch(self) -> None:
        """Download the split's archive into ``root`` (checked against its md5) and unpack it."""
        download_and_extract(self.resources[self.split], self.root)


class LastRecording:
    """The recording read last, kept so that the samples cut from one file parse it once.

    Not pickled: each DataLoader worker reads its own recordings.
    """

    def __init__(self) -> None:
        self.path: Path | None = None
        self.events: np.ndarray | None = None

    def read(self, path: Path, reader: Callable[[Path], np.ndarray]) -> np.ndarray:
        """The events of ``path``: the kept ones if it was the last file read, else ``reader(path)``."""
        if self.events is None or self.path != path:
            self.path, self.events = path, reader(path)
        return self.events

    def __reduce__(self):
        return LastRecording, ()


def not_found(name: str, looked_for: str | os.PathLike, how: str) -> DatasetNotFoundError:
    """The one-sentence error for a dataset whose files are missing."""
    return DatasetNotFoundError(f"{name} not found: looked for {looked_for}; {how}.")


def sorted_files(folder: Path, suffix: str) -> list[Path]:
    """Files with ``suffix`` in ``folder`` (not recursive), in a stable, platform-free order."""
    return sorted((p for p in folder.iterdir() if p.is_file() and p.name.endswith(suffix)),
                  key=lambda p: p.name)


def describe_part(part: Any) -> str:
    """Which part of a file a sample is, for messages: 'sample 12' or 'the segment 0-500000 us'."""
    if isinstance(part, dict):
        if part.get("sample") is not None:
            return f"sample {part['sample']}"
        if part.get("start_us") is not None:
            return f"the segment {part['start_us']}-{part['end_us']} us"
    return ""
