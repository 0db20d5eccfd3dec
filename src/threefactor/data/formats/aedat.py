"""AEDAT 3.1, the event files of DV, jAER and cAER (and of DVS128 Gesture).

Text header lines starting with '#', the first ``#!AER-DAT3.1``, the last ``#!END-HEADER\\r\\n``;
then packets, each a 28-byte little-endian header (eventType int16, eventSource int16,
eventSize int32, eventTSOffset int32, eventTSOverflow int32, eventCapacity int32, eventNumber
int32, eventValid int32) and ``eventCapacity * eventSize`` bytes of events. Polarity events
(type 1) are 8 bytes: uint32 data (bit 0 valid, bit 1 polarity, bits 2-16 y, bits 17-31 x) and
int32 timestamp; the full timestamp is ``eventTSOverflow << 31 | timestamp`` in us. Other
packet types are skipped.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from ...errors import EventFileError
from ..events import EVENT_DTYPE

HEADER_END = b"#!END-HEADER\r\n"
PACKET_HEADER = np.dtype([
    ("eventType", "<i2"), ("eventSource", "<i2"), ("eventSize", "<i4"), ("eventTSOffset", "<i4"),
    ("eventTSOverflow", "<i4"), ("eventCapacity", "<i4"), ("eventNumber", "<i4"), ("eventValid", "<i4"),
])
POLARITY_TYPE = 1
POLARITY_EVENT = np.dtype([("data", "<u4"), ("ts", "<i4")])
_MAX_COORD = (1 << 15) - 1  # x and y have 15 bits each


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
