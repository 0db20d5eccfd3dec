"""Events in ``.npy`` files: a structured array with fields x, y, t (us), p -- what
``np.save(path, events)`` writes -- or an (N, 4) numeric array whose columns and time unit are
named, such as DVS128 Gesture's preprocessed files (Tonic's layout: columns x, y, p, t, with t in
milliseconds).
"""

from __future__ import annotations

import os

import numpy as np

from ...errors import EventFileError
from ..events import MAX_COORD, make_events


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
        if v.size and (not np.all(np.isfinite(v)) or v.min() < 0 or v.max() > MAX_COORD or np.any(v != np.floor(v))):
            raise EventFileError(path, f"its {k} coordinates are not whole numbers in 0..{MAX_COORD}")
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
