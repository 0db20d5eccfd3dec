"""The csv files that label recordings.

- A listing ``file,label``: one sample per file (the ``labels.csv`` of a folder of recordings).
- Segments ``class,startTime_usec,endTime_usec``: one sample per row, a time span of one
  recording, as DVS128 Gesture's ``userXX_<lighting>_labels.csv`` beside each recording. DVS
  Gesture numbers its 11 classes 1..11; your own files may name classes as you like.
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator

import numpy as np

from ...errors import DataFileError

GESTURE_CLASS_COUNT = 11  # DVS Gesture's files number the classes 1..11
LABEL_DTYPE = np.dtype([("label", "<i8"), ("start", "<i8"), ("end", "<i8")])


def _rows(path: str | os.PathLike, what: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, stripped cells) of every line of a UTF-8 csv file that is not blank."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except UnicodeDecodeError:
        raise DataFileError(path, f"it is not UTF-8 text, so it is not {what}") from None
    for n, line in enumerate(text.splitlines(), 1):
        cells = [c.strip() for c in line.split(",")]
        if any(cells):
            yield n, cells


def read_file_labels(path: str | os.PathLike) -> list[tuple[str, str]]:
    """Rows (file, label) of a ``file,label`` listing; a header line ``file,label`` is skipped."""
    rows = []
    for n, cells in _rows(path, "a file,label listing"):
        if n == 1 and [c.lower() for c in cells] == ["file", "label"]:
            continue
        if len(cells) != 2 or not all(cells):
            raise DataFileError(path, f"line {n} is not 'file,label'")
        rows.append((cells[0], cells[1]))
    return rows


def read_segments_csv(path: str | os.PathLike) -> list[tuple[str, int, int]]:
    """Rows (class, start_us, end_us) of a ``class,startTime_usec,endTime_usec`` file.

    The class is returned as written (a number in DVS Gesture, any name in your own files).
    """
    rows: list[tuple[str, int, int]] = []
    for n, cells in _rows(path, "a label csv"):
        if n == 1 and cells[0].lower() == "class":
            continue  # header
        if len(cells) != 3:
            raise DataFileError(path, f"line {n} has {len(cells)} fields, not class,start,end")
        try:
            start, end = int(cells[1]), int(cells[2])
        except ValueError:
            raise DataFileError(path, f"line {n} has a start or end time that is not an integer") from None
        if not cells[0] or start < 0 or end < start:
            raise DataFileError(path, f"line {n} has no class or an end time before its start time")
        rows.append((cells[0], start, end))
    return rows


def read_labels_csv(path: str | os.PathLike) -> np.ndarray:
    """DVS Gesture ``_labels.csv`` as (label, start, end) with labels 0..10 (the file's 1..11 minus 1)."""
    rows = read_segments_csv(path)
    out = np.empty(len(rows), dtype=LABEL_DTYPE)
    for i, (cls, start, end) in enumerate(rows):
        if not cls.isdigit() or not 1 <= int(cls) <= GESTURE_CLASS_COUNT:
            raise DataFileError(path, f"row {i + 1} has class {cls!r}, not a number in 1..{GESTURE_CLASS_COUNT}")
        out[i] = (int(cls) - 1, start, end)
    return out


def write_labels_csv(path: str | os.PathLike, rows: Iterable[tuple[object, int, int]]) -> None:
    """Write (class, start_us, end_us) rows with the DVS Gesture header line."""
    with open(path, "w", newline="") as f:
        f.write("class,startTime_usec,endTime_usec\r\n")
        for cls, start, end in rows:
            f.write(f"{cls},{int(start)},{int(end)}\r\n")
