"""N-MNIST's 40-bit ``.bin`` event format (Orchard et al. 2015).

Each record is 5 bytes: x, y, then 24 bits big-endian whose top bit is the polarity and whose
low 23 bits are the timestamp in microseconds. A record with y == 240 is no event but a
timestamp-overflow marker: every later timestamp gets 2^13 us added. (2^13, not 2^23, is what
the original MATLAB reader and Tonic add; we read files the way they do, so our times agree
with every published result, and our writer emits markers to match.)
"""

from __future__ import annotations

import os

import numpy as np

from ...errors import EventFileError
from ..events import EVENT_DTYPE

OVERFLOW_Y = 240
OVERFLOW_STEP_US = 1 << 13
MAX_TIMESTAMP_US = (1 << 23) - 1
RECORD_BYTES = 5


def decode_bin(data: bytes | bytearray | memoryview | np.ndarray, path: str | os.PathLike | None = None) -> np.ndarray:
    """Events of N-MNIST ``.bin`` content; ``path`` only names the file in errors."""
    raw = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.view(np.uint8).ravel()
    if raw.size % RECORD_BYTES:
        raise EventFileError(
            path, f"its {raw.size} bytes are not a whole number of {RECORD_BYTES}-byte N-MNIST "
            "records, so it is truncated or not an N-MNIST file"
        )
    rec = raw.reshape(-1, RECORD_BYTES)
    y = rec[:, 1]
    ts = ((rec[:, 2].astype(np.int64) & 0x7F) << 16) | (rec[:, 3].astype(np.int64) << 8) | rec[:, 4]
    marker = y == OVERFLOW_Y
    if marker.any():
        # Vectorised form of "for each marker: ts[marker:] += 2^13".
        ts += OVERFLOW_STEP_US * np.cumsum(marker, dtype=np.int64)
        keep = ~marker
        rec, ts = rec[keep], ts[keep]
    events = np.empty(len(ts), dtype=EVENT_DTYPE)
    events["x"] = rec[:, 0]
    events["y"] = rec[:, 1]
    events["t"] = ts
    events["p"] = rec[:, 2] >> 7
    return events


def read_bin(path: str | os.PathLike) -> np.ndarray:
    """Events (``EVENT_DTYPE``, t in us) of one N-MNIST ``.bin`` file, in file order."""
    return decode_bin(np.fromfile(path, dtype=np.uint8), path)


def encode_bin(events: np.ndarray) -> bytes:
    """N-MNIST ``.bin`` content for ``events``, with overflow markers wherever t > 2^23 - 1.

    Raises ``ValueError`` for events the format cannot hold: x or y outside 0..255, y == 240,
    p not 0/1, t < 0, or a timestamp that drops so far below an earlier one that the markers
    already written (they only ever add time) would overshoot it.
    """
    x = np.asarray(events["x"], dtype=np.int64)
    y = np.asarray(events["y"], dtype=np.int64)
    t = np.asarray(events["t"], dtype=np.int64)
    p = np.asarray(events["p"], dtype=np.int64)
    if len(t) == 0:
        return b""
    if x.min() < 0 or x.max() > 255 or y.min() < 0 or y.max() > 255:
        raise ValueError("N-MNIST records hold x and y in 0..255")
    if np.any(y == OVERFLOW_Y):
        raise ValueError(f"y == {OVERFLOW_Y} marks a timestamp overflow in N-MNIST files and cannot be an event")
    if not np.isin(p, (0, 1)).all():
        raise ValueError("N-MNIST polarities must be 0 or 1")
    if t.min() < 0:
        raise ValueError("N-MNIST timestamps must be >= 0")
    # Markers are cumulative, so the count before each event can only grow along the file.
    need = np.maximum(0, -((MAX_TIMESTAMP_US - t) // OVERFLOW_STEP_US))
    markers = np.maximum.accumulate(need)
    low = t - markers * OVERFLOW_STEP_US
    if low.min() < 0:
        raise ValueError("timestamps fall too far after a late one to be written with overflow markers; sort by t first")
    n = len(t)
    out = np.zeros((n + int(markers[-1]), RECORD_BYTES), dtype=np.uint8)
    out[:, 1] = OVERFLOW_Y  # every row that is not an event is a marker
    rows = np.arange(n) + markers
    out[rows, 0] = x
    out[rows, 1] = y
    out[rows, 2] = (p << 7) | (low >> 16)
    out[rows, 3] = (low >> 8) & 0xFF
    out[rows, 4] = low & 0xFF
    return out.tobytes()


def write_bin(path: str | os.PathLike, events: np.ndarray) -> None:
    """Write ``events`` as an N-MNIST ``.bin`` file that ``read_bin`` reads back exactly."""
    data = encode_bin(events)
    with open(path, "wb") as f:
        f.write(data)
