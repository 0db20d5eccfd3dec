"""A run directory held by one run at a time, and files written into it whole or not at all.

``RunDirectory.open`` takes an exclusive lock on the directory (``flock`` on a lock file in it),
held for the life of the run and released by the operating system if the process dies, even by
``kill -9``: a second run into the same directory is refused in one sentence before it writes
anything, and the first goes on untouched. A new run's files (``config.yaml``,
``metrics.jsonl``, the directory itself if the run made it) are removed again if the run fails
or is interrupted before ``started()``, i.e. before its first checkpoint: a start that fails
(missing data, no CUDA, a network that does not fit the data) leaves no half-made run behind.

Files in it are written with ``atomic.write_atomic``: whole or not at all.
"""

from __future__ import annotations

import io
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

from ..atomic import TEMP_SUFFIX, write_atomic
from ..errors import RunDirectoryError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX (Windows): runs are not locked there
    fcntl = None

LOCK_NAME = ".threefactor.lock"
CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.jsonl"
CHECKPOINT_NAME = "checkpoint.pt"


class RunLock:
    """An exclusive, non-blocking lock on a directory, held until ``release``."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise ``RunDirectoryError`` naming the run that holds it."""
        if fcntl is None:
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunDirectoryError(
                    f"{self.path.parent} is in use by another threefactor run{holder}; wait for it "
                    "to end or choose another --out") from None
            except OSError as err:
                os.close(fd)
                raise RunDirectoryError(f"cannot lock the run directory {self.path.parent}: {err.strerror}") from None
            # A holder that was just ending may have removed the file we opened: then our lock
            # is on a file nobody else sees, so take it again on the one now at the path.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd

    def release(self, remove: bool = True) -> None:
        """Give the lock up; ``remove`` deletes the lock file first (while still holding it)."""
        if self._fd is None:
            return
        if remove:
            try:
                os.unlink(self.path)
            except OSError:
                pass
        os.close(self._fd)
        self._fd = None


def _read_holder(fd: int) -> str:
    """' (pid 123 on host, since ...)' from a lock file, or '' when it says nothing usable."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode())
        return f" (pid {int(info['pid'])} on {info['host']}, since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


class RunDirectory:
    """An open run directory: locked by this run, its metrics file open for appending rows.

    ``fresh`` is True when the run starts from nothing (a new run, or ``--resume`` of a run
    that never reached its first checkpoint), False when it continues from the checkpoint.
    """

    def __init__(self, path: Path, metrics: BinaryIO, lock: RunLock | None, fresh: bool,
                 created: list[Path], made_dir: bool) -> None:
        self.path, self.metrics, self.fresh = path, metrics, fresh
        self._lock, self._created, self._made_dir = lock, created, made_dir
        self._started = not created and not made_dir

    @classmethod
    def detached(cls) -> "RunDirectory":
        """A stand-in for the processes of a torchrun launch that do not write the directory."""
        return cls(Path("."), io.BytesIO(), None, fresh=True, created=[], made_dir=False)

    @classmethod
    def open(cls, path: Path, config_text: str, resume: bool, metrics_name: str = METRICS_NAME) -> "RunDirectory":
        """Lock ``path`` and check it: a new run must not overwrite a run (a checkpoint, or
        metrics rows), ``resume`` needs one; a new run's ``config.yaml`` is written here.
        ``metrics_name``: the file of metrics rows (a stream writes ``stream.jsonl``)."""
        path = Path(path)
        if resume and not (path / CONFIG_NAME).is_file() and not (path / CHECKPOINT_NAME).exists():
            raise RunDirectoryError(f"{path}: nothing to resume, there is no run (config.yaml, "
                                    f"{CHECKPOINT_NAME}) there")
        made_dir = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunDirectoryError(f"cannot write the run directory {path}: {err.strerror}") from None
        lock = RunLock(path)
        try:
            lock.acquire()
        except BaseException:
            if made_dir:
                _remove_dir_if_empty(path)
            raise
        try:
            _remove_stale_temporaries(path)
            checkpoint, metrics = path / CHECKPOINT_NAME, path / metrics_name
            has_rows = metrics.is_file() and metrics.stat().st_size > 0
            if resume and checkpoint.exists():
                _probe_writable(path)
                # the resumed run's settings (e.g. more epochs) become the run's config.yaml
                if (path / CONFIG_NAME).read_text() != config_text:
                    write_atomic(path / CONFIG_NAME, config_text.encode())
                return cls(path, open(metrics, "r+b" if metrics.exists() else "w+b"), lock,
                           fresh=False, created=[], made_dir=False)
            if checkpoint.exists():
                raise RunDirectoryError(
                    f"{path} already holds a run ({CHECKPOINT_NAME}); continue it with --resume {path} "
                    "or choose another --out")
            if has_rows:
                raise RunDirectoryError(
                    f"{path} holds metrics rows ({metrics_name}) but no {CHECKPOINT_NAME}, so its run "
                    "can be neither continued nor overwritten safely; choose another --out")
            # A new run, or one that never reached its first checkpoint (then nothing of it is
            # lost by starting it again; --resume keeps the config.yaml it was started with).
            try:
                if not resume:
                    write_atomic(path / CONFIG_NAME, config_text.encode())
                created = [metrics] if resume else [path / CONFIG_NAME, metrics]
                return cls(path, open(metrics, "wb"), lock, fresh=True, created=created, made_dir=made_dir)
            except OSError as err:
                raise RunDirectoryError(f"cannot write the run directory {path}: {err.strerror}") from None
        except BaseException:
            lock.release(remove=True)
            if made_dir:
                _remove_dir_if_empty(path)
            raise

    def started(self) -> None:
        """The run has written its first checkpoint: from now on its files are kept, whatever happens."""
        self._started = True

    def close(self) -> None:
        """Close the metrics file and release the lock; a run that never started is removed."""
        self.metrics.close()
        if not self._started:
            for p in self._created:
                try:
                    p.unlink()
                except OSError:
                    pass
        if self._lock is not None:
            self._lock.release(remove=True)
        if not self._started and self._made_dir:
            _remove_dir_if_empty(self.path)


def _probe_writable(path: Path) -> None:
    try:
        tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-").close()
    except OSError as err:
        raise RunDirectoryError(f"cannot write the run directory {path}: {err.strerror}") from None


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary files of writes that a killed run left (only the holder of the lock writes)."""
    for tmp in path.glob(f".*{TEMP_SUFFIX}"):
        try:
            tmp.unlink()
        except OSError:
            pass


def _remove_dir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass
