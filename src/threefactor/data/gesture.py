"""DVS128 Gesture (Amir et al. 2017): AEDAT 3.1 recordings with label csv files, the
one-``.npy``-per-gesture layout, and the dataset over either.

AEDAT 3.1: text header lines starting with '#', the first ``#!AER-DAT3.1``, the last
``#!END-HEADER\\r\\n``; then packets, each a 28-byte little-endian header (eventType int16,
eventSource int16, eventSize int32, eventTSOffset int32, eventTSOverflow int32,
eventCapacity int32, eventNumber int32, eventValid int32) and ``eventCapacity * eventSize``
bytes of events. Polarity events (type 1) are 8 bytes: uint32 data (bit 0 valid, bit 1
polarity, bits 2-16 y, bits 17-31 x) and int32 timestamp; the full timestamp is
``eventTSOverflow << 31 | timestamp`` in us. Other packet types are skipped.

``userXX_<lighting>_labels.csv`` has rows ``class,startTime_usec,endTime_usec`` (classes 1..11)
that cut each recording into gestures. Users 1-23 are the training set, 24-29 the test set.

The preprocessed layout (Tonic's DVSGesture) is ``ibmGestureTrain/userXX_<lighting>/<label>.npy``
(labels 0..10), each an (N, 4) array with columns x, y, p, t and t in milliseconds.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .base import EventDataset, check_outside_sensor, check_split, not_found, sorted_files
from .download import Resource, download_and_extract
from ..errors import DataFileError, EventFileError
from .events import EVENT_DTYPE, make_events

SENSOR_SIZE = (128, 128, 2)
CLASSES = (
    "hand_clapping", "right_hand_wave", "left_hand_wave", "right_arm_clockwise",
    "right_arm_counter_clockwise", "left_arm_clockwise", "left_arm_counter_clockwise",
    "arm_roll", "air_drums", "air_guitar", "other_gestures",
)
TRAIN_USERS = range(1, 24)
TEST_USERS = range(24, 30)

HEADER_END = b"#!END-HEADER\r\n"
PACKET_HEADER = np.dtype([
    ("eventType", "<i2"), ("eventSource", "<i2"), ("eventSize", "<i4"), ("eventTSOffset", "<i4"),
    ("eventTSOverflow", "<i4"), ("eventCapacity", "<i4"), ("eventNumber", "<i4"), ("eventValid", "<i4"),
])
POLARITY_TYPE = 1
POLARITY_EVENT = np.dtype([("data", "<u4"), ("ts", "<i4")])
_MAX_COORD = (1 << 15) - 1  # x and y have 15 bits each


# --------------------------------------------------------------------------- AEDAT 3.1

def _parse_header(data: bytes, path) -> int:
    """Byte offset of the first packet; checks that this is AEDAT 3.x."""
    if not data.startswith(b"#!AER-DAT"):
        raise EventFileError(path, "it does not start with an '#!AER-DAT' line, so it is not an AEDAT file")
    first_nl = data.find(b"\n")
    version = data[len(b"#!AER-DAT"):first_nl if first_nl >= 0 else len(data)].strip()
    if not version.startswith(b"3."):
        shown = version[:16].decode("ascii", "replace")
        raise EventFileError(path, f"its AEDAT version {shown!r} is not supported (only 3.x)")
    pos = 0
    while pos < len(data) and data[pos:pos + 1] == b"#":
        nl = data.find(b"\n", pos)
        if nl < 0:
            break
        line = data[pos:nl + 1]
        pos = nl + 1
        if line == HEADER_END:
            return pos
    raise EventFileError(path, "its header has no '#!END-HEADER' line, so it is truncated or not AEDAT 3.1")


def decode_aedat(data: bytes, path: str | os.PathLike | None = None) -> np.ndarray:
    """Polarity events of AEDAT 3.1 content; invalid events (valid bit 0) are dropped."""
    data = bytes(data)
    pos = _parse_header(data, path)
    n_bytes = len(data)
    chunks: list[np.ndarray] = []
    while pos < n_bytes:
        if n_bytes - pos < PACKET_HEADER.itemsize:
            raise EventFileError(path, f"it ends inside a packet header at byte {pos}, so it is truncated")
        h = np.frombuffer(data, dtype=PACKET_HEADER, count=1, offset=pos)[0]
        size, capacity, number = int(h["eventSize"]), int(h["eventCapacity"]), int(h["eventNumber"])
        if size < 0 or capacity < 0 or not 0 <= number <= capacity:
            raise EventFileError(
                path, f"the packet at byte {pos} has event size {size}, capacity {capacity} and "
                f"number {number}, which no valid packet has")
        body = pos + PACKET_HEADER.itemsize
        end = body + size * capacity
        if end > n_bytes:
            raise EventFileError(path, f"the packet at byte {pos} runs past the end of the file, so it is truncated")
        if int(h["eventType"]) == POLARITY_TYPE and number:
            if size != POLARITY_EVENT.itemsize or int(h["eventTSOffset"]) != 4:
                raise EventFileError(
                    path, f"the polarity packet at byte {pos} has {size}-byte events with the timestamp at "
                    f"offset {int(h['eventTSOffset'])}, not 8 bytes with it at offset 4")
            overflow = int(h["eventTSOverflow"])
            if overflow < 0:
                raise EventFileError(path, f"the packet at byte {pos} has a negative timestamp overflow count")
            ev = np.frombuffer(data, dtype=POLARITY_EVENT, count=number, offset=body)
            ev = ev[(ev["data"] & 1) == 1]
            ts = ev["ts"].astype(np.int64)
            if ts.size and ts.min() < 0:
                raise EventFileError(path, f"the packet at byte {pos} holds a negative timestamp")
            out = np.empty(len(ev), dtype=EVENT_DTYPE)
            out["x"] = (ev["data"] >> 17) & _MAX_COORD
            out["y"] = (ev["data"] >> 2) & _MAX_COORD
            out["p"] = (ev["data"] >> 1) & 1
            out["t"] = (np.int64(overflow) << 31) | ts
            chunks.append(out)
        pos = end
    return np.concatenate(chunks) if chunks else np.empty(0, dtype=EVENT_DTYPE)


def read_aedat(path: str | os.PathLike) -> np.ndarray:
    """Polarity events (``EVENT_DTYPE``, t in us) of one AEDAT 3.1 file, in file order."""
    with open(path, "rb") as f:
        return decode_aedat(f.read(), path)


def encode_aedat(
    events: np.ndarray,
    packet_size: int = 4096,
    source: int = 1,
    header: Sequence[str] = ("#Format: RAW", "#Source 1: DVS128"),
) -> bytes:
    """AEDAT 3.1 content holding ``events`` as polarity packets of at most ``packet_size``.

    A new packet starts whenever ``t >> 31`` changes, since a packet has one overflow count.
    Raises ``ValueError`` for x or y outside 0..32767, p not 0/1 or t < 0.
    """
    x, y, t, p = (np.asarray(events[k], dtype=np.int64) for k in ("x", "y", "t", "p"))
    if len(t):
        if min(x.min(), y.min()) < 0 or max(x.max(), y.max()) > _MAX_COORD:
            raise ValueError(f"AEDAT 3.1 polarity events hold x and y in 0..{_MAX_COORD}")
        if not np.isin(p, (0, 1)).all():
            raise ValueError("polarities must be 0 or 1")
        if t.min() < 0:
            raise ValueError("timestamps must be >= 0")
    if packet_size < 1:
        raise ValueError(f"packet_size must be >= 1, got {packet_size}")
    lines = ["#!AER-DAT3.1", *header]
    parts = ["".join(line + "\r\n" for line in lines).encode("ascii"), HEADER_END]
    words = np.empty(len(t), dtype=POLARITY_EVENT)
    words["data"] = ((x << 17) | (y << 2) | (p << 1) | 1).astype(np.uint32)
    words["ts"] = (t & 0x7FFFFFFF).astype(np.int32)
    overflow = t >> 31
    breaks = np.flatnonzero(np.diff(overflow)) + 1
    for run in np.split(np.arange(len(t)), breaks) if len(t) else []:
        for start in range(0, len(run), packet_size):
            idx = run[start:start + packet_size]
            n = len(idx)
            h = np.zeros(1, dtype=PACKET_HEADER)
            h["eventType"], h["eventSource"], h["eventSize"], h["eventTSOffset"] = POLARITY_TYPE, source, 8, 4
            h["eventTSOverflow"] = int(overflow[idx[0]])
            h["eventCapacity"] = h["eventNumber"] = h["eventValid"] = n
            parts += [h.tobytes(), words[idx[0]:idx[-1] + 1].tobytes()]
    return b"".join(parts)


def write_aedat(path: str | os.PathLike, events: np.ndarray, packet_size: int = 4096) -> None:
    """Write ``events`` as an AEDAT 3.1 file that ``read_aedat`` reads back exactly."""
    data = encode_aedat(events, packet_size)
    with open(path, "wb") as f:
        f.write(data)


# --------------------------------------------------------------------------- label csv

LABEL_DTYPE = np.dtype([("label", "<i8"), ("start", "<i8"), ("end", "<i8")])


def read_segments_csv(path: str | os.PathLike) -> list[tuple[str, int, int]]:
    """Rows (class, start_us, end_us) of a ``class,startTime_usec,endTime_usec`` file.

    The class is returned as written (a number in DVS Gesture, any name in your own files).
    """
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except UnicodeDecodeError:
        raise DataFileError(path, "it is not UTF-8 text, so it is not a label csv") from None
    rows: list[tuple[str, int, int]] = []
    for n, line in enumerate(text.splitlines(), 1):
        cells = [c.strip() for c in line.split(",")]
        if not any(cells) or (n == 1 and cells[0].lower() == "class"):
            continue  # blank line or header
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
        if not cls.isdigit() or not 1 <= int(cls) <= len(CLASSES):
            raise DataFileError(path, f"row {i + 1} has class {cls!r}, not a number in 1..{len(CLASSES)}")
        out[i] = (int(cls) - 1, start, end)
    return out


def write_labels_csv(path: str | os.PathLike, rows: Iterable[tuple[object, int, int]]) -> None:
    """Write (class, start_us, end_us) rows with the DVS Gesture header line."""
    with open(path, "w", newline="") as f:
        f.write("class,startTime_usec,endTime_usec\r\n")
        for cls, start, end in rows:
            f.write(f"{cls},{int(start)},{int(end)}\r\n")


def cut(events: np.ndarray, start_us: int, end_us: int) -> np.ndarray:
    """Events with ``start_us <= t < end_us``, their times shifted so the segment starts at 0."""
    seg = events[(events["t"] >= start_us) & (events["t"] < end_us)].copy()
    seg["t"] -= start_us
    return seg


# --------------------------------------------------------------------------- .npy event arrays

def read_npy_events(path: str | os.PathLike, columns: str = "xypt", time_scale_us: float = 1000.0) -> np.ndarray:
    """Events from a ``.npy`` file: a structured array with fields x, y, t (us), p, or an (N, 4)
    numeric array whose columns are named by ``columns`` and whose times are in units of
    ``time_scale_us`` microseconds (DVS Gesture's preprocessed files: "xypt", ms = 1000)."""
    if not time_scale_us > 0:
        raise ValueError(f"time_scale_us must be > 0, got {time_scale_us}")
    try:
        arr = np.load(path, allow_pickle=False)
    except OSError:
        if not os.path.isfile(path):
            raise
        raise EventFileError(path, "it is not a readable .npy file (bad header or truncated)") from None
    except Exception:  # noqa: BLE001 - numpy's header parser raises many types on garbage
        raise EventFileError(path, "it is not a readable .npy file (bad header or truncated)") from None
    if not isinstance(arr, np.ndarray):
        arr.close()  # an .npz archive: np.load opened it as a zip
        raise EventFileError(path, "it holds several arrays, not one event array")
    if arr.dtype.names is not None:
        if not {"x", "y", "t", "p"} <= set(arr.dtype.names) or arr.ndim != 1:
            raise EventFileError(path, "its structured array needs fields x, y, t, p in one dimension")
        cols = {k: arr[k] for k in "xytp"}
        scale = 1.0
    else:
        if sorted(columns) != sorted("xytp"):
            raise ValueError(f"columns must name x, y, t, p once each, got {columns!r}")
        if arr.ndim != 2 or arr.shape[1] != 4:
            raise EventFileError(path, f"it holds an array of shape {arr.shape}, not (N, 4) events")
        cols = {k: arr[:, i] for i, k in enumerate(columns)}
        scale = time_scale_us
    for k, v in cols.items():
        if v.ndim != 1:
            raise EventFileError(path, f"its {k} field is not one number per event")
        if v.dtype.kind not in "biuf":
            raise EventFileError(path, f"its {k} values are of type {v.dtype}, not numbers")
    x, y, t, p = (np.asarray(cols[k]) for k in "xytp")
    for k, v in (("x", x), ("y", y)):
        if v.size and (not np.all(np.isfinite(v)) or v.min() < 0 or v.max() > _MAX_COORD or np.any(v != np.floor(v))):
            raise EventFileError(path, f"its {k} coordinates are not whole numbers in 0..{_MAX_COORD}")
    if p.size and not np.isin(p, (0, 1)).all():
        raise EventFileError(path, "its polarities are not all 0 or 1")
    if t.dtype.kind in "biu" and scale == int(scale):
        if t.size and t.dtype.kind == "u" and t.max() >= 2**62:
            raise EventFileError(path, "its timestamps are too large")
        t_us = t.astype(np.int64)
        if t.size and (t_us.min() < 0 or t_us.max() > 2**62 // int(scale)):
            raise EventFileError(path, "its timestamps are negative or too large")
        t_us = t_us * int(scale)
    else:
        t_us = np.asarray(t, dtype=np.float64) * scale
        if t.size and (not np.all(np.isfinite(t_us)) or t_us.min() < 0 or t_us.max() >= 2.0 ** 62):
            raise EventFileError(path, "its timestamps are negative, not finite or too large")
        t_us = np.rint(t_us).astype(np.int64)
    return make_events(x.astype(np.int64), y.astype(np.int64), t_us, p.astype(np.int64))


def write_gesture_npy(path: str | os.PathLike, events: np.ndarray) -> None:
    """Write ``events`` in the preprocessed DVS Gesture form: (N, 4) columns x, y, p, t in ms.

    Whole milliseconds are stored as integers (as the dataset has them); finer times as float64
    milliseconds, so ``read_npy_events`` gives the same microseconds back.
    """
    t = np.asarray(events["t"], dtype=np.int64)
    if t.size and t.min() < 0:
        raise ValueError("timestamps must be >= 0")
    if np.all(t % 1000 == 0):
        cols = (events["x"], events["y"], events["p"], t // 1000)
        arr = np.stack([np.asarray(c, dtype=np.int64) for c in cols], axis=1) if t.size else np.zeros((0, 4), np.int64)
    else:
        cols = (events["x"], events["y"], events["p"], t / 1000.0)
        arr = np.stack([np.asarray(c, dtype=np.float64) for c in cols], axis=1)
    with open(path, "wb") as f:
        np.save(f, arr)


# --------------------------------------------------------------------------- dataset

_USER = re.compile(r"user(\d+)_")


def _user_of(name: str) -> int | None:
    m = _USER.match(name)
    return int(m.group(1)) if m else None


class DVSGesture(EventDataset):
    """DVS128 Gesture, 11 classes, sensor (128, 128, 2), from either layout under ``root``:

    - ``layout="npy"``: ``root/ibmGestureTrain/userXX_<lighting>/<label>.npy`` (and ``ibmGestureTest``),
      the preprocessed archives that ``download=True`` fetches;
    - ``layout="aedat"``: the original ``root/DvsGesture/userXX_<lighting>.aedat`` with
      ``..._labels.csv`` beside each (or the same files directly in ``root``); users 1-23 train,
      24-29 test, unless ``trials_to_train.txt``/``trials_to_test.txt`` list the files.
    - ``layout="auto"`` takes whichever is present (npy first).

    Gesture times start at 0 at the gesture's start (AEDAT) or as stored (npy). Reading from
    AEDAT parses a whole recording per gesture; the last recording is kept in memory, and
    ``CachedDataset`` avoids the rest.
    """

    classes = CLASSES
    sensor_size = SENSOR_SIZE
    npy_folders = {"train": "ibmGestureTrain", "test": "ibmGestureTest"}
    # The preprocessed archives (figshare, as Tonic fetches them) and their md5 sums.
    resources = {
        "train": Resource("https://figshare.com/ndownloader/files/38022171", "ibmGestureTrain.tar.gz",
                          md5="3a8f0d4120a166bac7591f77409cb105"),
        "test": Resource("https://figshare.com/ndownloader/files/38020584", "ibmGestureTest.tar.gz",
                         md5="56070e45dadaa85fff82e0fbfbc06de5"),
    }
    # IBM's original AEDAT archive sits behind a web page, so it cannot be fetched by script.
    aedat_page = "https://ibm.ent.box.com/s/3hiq58ww1pbbjrinh367ykfdf60xsfm8/folder/50167556794"

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        transform=None,
        download: bool = False,
        layout: str = "auto",
        target_transform=None,
        outside_sensor: str = "error",
    ) -> None:
        if layout not in ("auto", "npy", "aedat"):
            raise ValueError(f"layout must be 'auto', 'npy' or 'aedat', got {layout!r}")
        self.root = Path(root)
        self.split = check_split(split)
        self.transform = transform
        self.target_transform = target_transform
        self.outside_sensor = check_outside_sensor(outside_sensor)
        self._last: tuple[Path, np.ndarray] | None = None
        samples: list[tuple[Path, int, int | None, int | None]] = []
        if layout in ("auto", "npy"):
            samples = self._scan_npy()
        if not samples and layout in ("auto", "aedat"):
            samples = self._scan_aedat()
            layout = "aedat" if samples else layout
        if not samples and download and layout in ("auto", "npy"):
            download_and_extract(self.resources[split], self.root)
            samples = self._scan_npy()
        if not samples:
            npy = self.root / self.npy_folders[split] / "userXX_<lighting>" / "<label>.npy"
            aedat = self.root / "DvsGesture" / "userXX_<lighting>.aedat"
            raise not_found(
                f"DVS Gesture {split} split", f"{npy} and {aedat} (with _labels.csv)",
                f"pass download=True to fetch the preprocessed {self.resources[split].url}, or download "
                f"DvsGesture.tar.gz from {self.aedat_page} and unpack it into {self.root}"
            )
        self.layout = "npy" if samples[0][2] is None else "aedat"
        self.samples = samples
        self.targets = np.asarray([s[1] for s in samples], dtype=np.int64)

    def _scan_npy(self) -> list[tuple[Path, int, None, None]]:
        folder = self.root / self.npy_folders[self.split]
        if not folder.is_dir():
            return []
        out = []
        for rec in sorted((d for d in folder.iterdir() if d.is_dir()), key=lambda d: d.name):
            files = [f for f in sorted_files(rec, ".npy") if f.stem.isdigit()]
            for f in sorted(files, key=lambda f: int(f.stem)):
                out.append((f, int(f.stem), None, None))
        return out

    def _scan_aedat(self) -> list[tuple[Path, int, int, int]]:
        folder = self.root / "DvsGesture"
        if not folder.is_dir():
            folder = self.root
        if not folder.is_dir():
            return []
        files = sorted_files(folder, ".aedat")
        trials = folder / f"trials_to_{self.split}.txt"
        if trials.is_file():
            wanted = {line.strip() for line in trials.read_text().splitlines() if line.strip()}
            files = [f for f in files if f.name in wanted]
        else:
            users = TRAIN_USERS if self.split == "train" else TEST_USERS
            files = [f for f in files if _user_of(f.name) in users]
        out = []
        for f in files:
            csv = f.with_name(f.stem + "_labels.csv")
            if not csv.is_file():
                raise not_found(f"the labels of {f.name}", csv,
                                "every DVS Gesture recording needs its _labels.csv beside it")
            for label, start, end in read_labels_csv(csv):
                out.append((f, int(label), int(start), int(end)))
        return out

    def events(self, i: int) -> np.ndarray:
        path, _, start, end = self.samples[i]
        if start is None:
            return read_npy_events(path, "xypt", 1000.0)
        if self._last is None or self._last[0] != path:
            self._last = (path, read_aedat(path))
        return cut(self._last[1], start, end)

    def source(self, i: int) -> tuple[str, object]:
        path, _, start, end = self.samples[i]
        return str(path), None if start is None else {"start_us": start, "end_us": end}

    def __getstate__(self):
        # Worker processes re-read their own recordings; do not ship a parsed one to each.
        state = self.__dict__.copy()
        state["_last"] = None
        return state


__all__ = [
    "SENSOR_SIZE", "CLASSES", "read_aedat", "decode_aedat", "write_aedat", "encode_aedat",
    "read_labels_csv", "read_segments_csv", "write_labels_csv", "cut", "read_npy_events",
    "write_gesture_npy", "DVSGesture",
]
