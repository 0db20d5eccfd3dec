"""Files written whole or not at all.

``write_atomic`` writes under a unique, hidden temporary name in the same directory and renames
the file into place, so neither a crash nor a concurrent writer ever leaves a torn file, and
the temporary file is removed if the write fails.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

TEMP_SUFFIX = ".tmp"


def write_atomic(path: str | os.PathLike, data: bytes, fsync: bool = False) -> None:
    """``data`` into ``path`` through a uniquely named temporary file in the same directory,
    renamed over ``path``; the temporary file is removed if anything fails."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
