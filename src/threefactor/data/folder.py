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
from typing import Sequence

import numpy as np

from .base import EventDataset, not_found
from .errors import DataFileError, EventFileError
from .gesture import cut, read_aedat, read_npy_events, read_segments_csv
from .nmnist import read_bin

SUFFIXES = (".aedat", ".npy", ".bin")
LABELS_FILE = "labels.csv"
SEGMENTS_SUFFIX = "_labels.csv"


def read_events(path: str | os.PathLike, npy_columns: str = "xytp", npy_time_scale_us: float = 1.0) -> np.ndarray:
    """Events of one recording, by its suffix (.aedat, .npy, .bin)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".aedat":
        return read_aedat(path)
    if suffix == ".npy":
        return read_npy_events(path, npy_columns, npy_time_scale_us)
    if suffix == ".bin":
        return read_bin(path)
    raise EventFileError(path, f"its suffix {suffix!r} is not one of {', '.join(SUFFIXES)}")


def _read_labels_file(path: Path) -> list[tuple[str, str]]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise DataFileError(path, "it is not UTF-8 text") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        cells = [c.strip() for c in line.split(",")]
        if not any(cells) or (n == 1 and [c.lower() for c in cells] == ["file", "label"]):
            continue
        if len(cells) != 2 or not all(cells):
            raise DataFileError(path, f"line {n} is not 'file,label'")
        rows.append((cells[0], cells[1]))
    return rows


def _class_order(names) -> list[str]:
    names = set(names)
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)  # "2" before "10"
    return sorted(names)


class EventFolder(EventDataset):
    """Samples from a folder of your recordings; ``dataset[i] -> (transform(events), label)``.

    ``classes`` fixes the class order (use the same list for a train and a test folder so the
    indices agree); by default it is the sorted label names (numerically, if all are numbers).
    ``sensor_size`` (W, H, P) defaults to what the recordings span (read once, here).
    ``npy_columns`` / ``npy_time_scale_us`` describe plain (N, 4) ``.npy`` arrays.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform=None,
        sensor_size: tuple[int, int, int] | None = None,
        classes: Sequence[str] | None = None,
        target_transform=None,
        npy_columns: str = "xytp",
        npy_time_scale_us: float = 1.0,
    ) -> None:
        self.root = Path(root)
        self.transform = transform
        self.target_transform = target_transform
        self.npy_columns = npy_columns
        self.npy_time_scale_us = npy_time_scale_us
        self._last: tuple[Path, np.ndarray] | None = None
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
        unknown = sorted(set(names) - set(index))
        if unknown:
            raise ValueError(f"labels {unknown} of {self.root} are not in classes {list(self.classes)}")
        self.samples = samples
        self.targets = np.asarray([index[n] for n in names], dtype=np.int64)
        self.sensor_size = tuple(sensor_size) if sensor_size is not None else self._infer_sensor()

    def _scan(self) -> list[tuple[Path, str, int | None, int | None]]:
        listing = self.root / LABELS_FILE
        if listing.is_file():
            out = []
            for name, label in _read_labels_file(listing):
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

    def _infer_sensor(self) -> tuple[int, int, int]:
        w = h = 0
        for i in range(len(self)):
            ev = self.events(i)
            if len(ev):
                w, h = max(w, int(ev["x"].max()) + 1), max(h, int(ev["y"].max()) + 1)
        return (w, h, 2)

    def events(self, i: int) -> np.ndarray:
        path, _, start, end = self.samples[i]
        if start is None:
            return read_events(path, self.npy_columns, self.npy_time_scale_us)
        if self._last is None or self._last[0] != path:
            self._last = (path, read_events(path, self.npy_columns, self.npy_time_scale_us))
        return cut(self._last[1], start, end)

    def source(self, i: int) -> tuple[str, object]:
        path, _, start, end = self.samples[i]
        return str(path), {"start_us": start, "end_us": end, "npy_columns": self.npy_columns,
                           "npy_time_scale_us": self.npy_time_scale_us}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_last"] = None
        return state
