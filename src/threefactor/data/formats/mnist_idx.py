"""IDX files (plain or gzip), the format of MNIST, read with numpy."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from ...errors import DataFileError

# IDX type codes -> big-endian numpy types.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def decode_idx(data: bytes, path: str | os.PathLike | None = None) -> np.ndarray:
    """The array in IDX content (magic 0 0 <type> <ndim>, big-endian uint32 dims, then data)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise DataFileError(path, "it does not start with an IDX magic number")
    ndim = data[3]
    head = 4 + 4 * ndim
    if len(data) < head:
        raise DataFileError(path, "it ends inside its IDX header, so it is truncated")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[data[2]])
    count = int(np.prod(shape, dtype=object)) if shape else 1
    if len(data) - head != count * dtype.itemsize:
        raise DataFileError(
            path, f"its header promises {count} values of {dtype.itemsize} bytes but "
            f"{len(data) - head} bytes follow, so it is truncated or corrupt")
    return np.frombuffer(data, dtype=dtype, count=count, offset=head).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array of one IDX file; gzip-compressed files (by their magic bytes) are unpacked."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise DataFileError(path, f"its gzip stream is damaged ({exc})") from None
    return decode_idx(raw, path)
