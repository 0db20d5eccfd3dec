"""Your own recordings: a dataset over a folder of event files with labels.

Supported files: ``.aedat`` (AEDAT 3.1, as DV/jAER/cAER write them), ``.npy`` (a structured
array with fields x, y, t in us and p -- what ``np.save(path, events)`` writes -- or an (N, 4)
array whose columns and time unit you name) and ``.bin`` (the N-MNIST format).

Labels come from, in this order:
1. ``root/labels.csv`` with lines ``file,label`` (file relative to root): one sample per file;
2. ``<recording>_labels.csv`` beside a recording, lines ``class,startTime_usec,endTime_usec``
   as in DVS Gesture: one sample per line, cut out of the recording and starting at t = 0;
3. the recording's top-level subfolder under root (``root/<class>/...``), as torchvision's
   ImageFolder does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ...errors import DataFileError, UnknownClassError
from ..formats.event_file import SUFFIXES, read_events
from ..formats.label_csv import read_file_labels, read_segments_csv
from ..transforms import time_window
from .base import EventDataset, LastRecording, not_found

LABELS_FILE = "labels.csv"
SEGMENTS_SUFFIX = "_labels.csv"


def _class_order(names) -> list[str]:
    names = set(names)
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)  # "2" before "10"
    return sorted(names)


class EventFolder(EventDataset):
    """Samples from a folder of your recordings; ``dataset[i] -> (transform(events), label)``.

    ``classes`` fixes the class order (use the same list for a train and a test folder so the
    indices agree; a label not in it is an ``UnknownClassError``); by default it is the sorted
    label names (numerically, if all are numbers). ``sensor_size`` (W, H, P) defaults to what
    the recordings span (read once, here; ``sensor_inferred_from`` then names the event that set
    the width and height); pass the training folder's to a test folder. Every event is checked
    against it when read (see ``outside_sensor``). ``labels.csv`` may name only files inside
    ``root``. ``npy_columns`` / ``npy_time_scale_us`` describe plain (N, 4) ``.npy`` arrays.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable | None = None,
        sensor_size: tuple[int, int, int] | None = None,
        classes: Sequence[str] | None = None,
        target_transform: Callable | None = None,
        npy_columns: str = "xytp",
        npy_time_scale_us: float = 1.0,
        outside_sensor: str = "error",
    ) -> None:
        super().__init__(transform, target_transform, outside_sensor)
        self.root = Path(root)
        self.npy_columns = npy_columns
        self.npy_time_scale_us = npy_time_scale_us
        self._last = LastRecording()
        if not self.root.is_dir():
            raise not_found("event folder", self.root, "pass the folder that holds your recordings")
        samples = self._scan()
        if not samples:
            raise not_found(
                "recordings", f"{self.root}/**/*{{{','.join(SUFFIXES)}}}",
                "put your files in class subfolders, or list them in labels.csv"
            )
        names = [s[1] for s in samples]
        self.classes = tuple(classes) if classes is not None else tuple(_class_order(names))
        index = {c: k for k, c in enumerate(self.classes)}
        for path, name, _, _ in samples:
            if name not in index:
                raise UnknownClassError(self.root, name, path, self.classes)
        self.samples = samples
        self.targets = np.asarray([index[n] for n in names], dtype=np.int64)
        self.sensor_inferred_from: str | None = None
        if sensor_size is not None:
            self.sensor_size = tuple(int(v) for v in sensor_size)
        else:
            self.sensor_size, self.sensor_inferred_from = self._infer_sensor()

    def _scan(self) -> list[tuple[Path, str, int | None, int | None]]:
        listing = self.root / LABELS_FILE
        if listing.is_file():
            out = []
            for n, (name, label) in enumerate(read_file_labels(listing), 1):
                if os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] == os.pardir:
                    raise DataFileError(
                        listing, f"row {n} names {name[:80]!r}, which is not inside {self.root}; "
                        "list files by their path relative to the folder")
                path = self.root / name
                if not path.is_file():
                    raise not_found(f"{name} (listed in {listing})", path, "fix the file name or add the file")
                out.append((path, label, None, None))
            return out
        out = []
        files = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        for path in files:
            segments = path.with_name(path.stem + SEGMENTS_SUFFIX)
            rel = path.relative_to(self.root)
            if segments.is_file():
                out += [(path, cls, start, end) for cls, start, end in read_segments_csv(segments)]
            elif len(rel.parts) > 1:
                out.append((path, rel.parts[0], None, None))
            else:
                raise ValueError(
                    f"{path} has no label: put it in a class subfolder, add {segments.name} beside it, "
                    f"or list every file in {listing}")
        return out

    def _infer_sensor(self) -> tuple[tuple[int, int, int], str]:
        """The smallest (W, H, 2) sensor that holds every event, and which events set W and H."""
        w = h = 0
        w_from = h_from = "no event"
        for i in range(len(self)):
            ev = self.events(i)
            if len(ev):
                x, y = int(ev["x"].max()), int(ev["y"].max())
                if x + 1 > w:
                    w, w_from = x + 1, f"x = {x} in {self.samples[i][0]}"
                if y + 1 > h:
                    h, h_from = y + 1, f"y = {y} in {self.samples[i][0]}"
        if not w:
            raise ValueError(f"{self.root}: all {len(self)} of its recordings are empty (no events), "
                             "so there is nothing to learn from and no sensor size to infer")
        return (w, h, 2), f"the largest {w_from} and {h_from}"

    def events(self, i: int) -> np.ndarray:
        path, _, start, end = self.samples[i]
        if start is None:
            return self._read(path)
        return time_window(self._last.read(path, self._read), start, end - start)

    def _read(self, path: Path) -> np.ndarray:
        return read_events(path, self.npy_columns, self.npy_time_scale_us)

    def source(self, i: int) -> tuple[str, object]:
        path, _, start, end = self.samples[i]
        return str(path), {"start_us": start, "end_us": end, "npy_columns": self.npy_columns,
                           "npy_time_scale_us": self.npy_time_scale_us}
