"""What every event dataset here shares: Tonic's shape plus the hooks the on-disk cache needs.

``dataset[i] -> (transform(events), label)``, with ``classes``, ``sensor_size`` (W, H, P) and
``targets``. Two more methods keep caching honest: ``events(i)`` gives the raw events (no
transform) and ``source(i)`` names where they come from (a file path plus what part of it),
so a cache can key on the file's size and mtime and never serve data from an older file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .errors import DatasetNotFoundError

SPLITS = ("train", "test")


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

    def events(self, i: int) -> np.ndarray:
        """Raw events of sample ``i`` (``EVENT_DTYPE``), before any transform."""
        raise NotImplementedError

    def source(self, i: int) -> tuple[str, Any]:
        """(file path, part of the file) that sample ``i`` is read from; the cache stats the path."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} samples")
        i = i % len(self)
        ev = self.events(i)
        x = self.transform(ev) if self.transform is not None else ev
        y = int(self.targets[i])
        if self.target_transform is not None:
            y = self.target_transform(y)
        return x, y


def not_found(name: str, looked_for: str | os.PathLike, how: str) -> DatasetNotFoundError:
    """The one-sentence error for a dataset whose files are missing."""
    return DatasetNotFoundError(f"{name} not found: looked for {looked_for}; {how}.")


def sorted_files(folder: Path, suffix: str) -> list[Path]:
    """Files with ``suffix`` in ``folder`` (not recursive), in a stable, platform-free order."""
    return sorted((p for p in folder.iterdir() if p.is_file() and p.name.endswith(suffix)),
                  key=lambda p: p.name)
