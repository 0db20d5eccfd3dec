"""The HDF5 files of the Spiking Heidelberg Digits (SHD, Cramer et al. 2020).

``shd_train.h5`` / ``shd_test.h5`` hold ``spikes/times`` (one variable-length array per sample,
seconds), ``spikes/units`` (matching arrays of channels 0..699), ``labels`` (0..19) and, in the
official files, ``extra/keys`` (class names). Events come out with x = unit, y = 0, p = 0 and
t in whole microseconds, so ``ToFrame((700, 1, 1))`` bins them. Needs h5py (``pip install
threefactor[data]``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ...errors import EventFileError
from ..events import EVENT_DTYPE, MAX_COORD


def _h5py():
    try:
        import h5py
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("reading SHD needs h5py: pip install 'threefactor[data]'") from exc
    return h5py


def _element_kind(h5py, dtype: np.dtype) -> str | None:
    """What a spikes dataset's elements are when they are not numbers ('strings'), else None."""
    base = h5py.check_vlen_dtype(dtype) or dtype
    if h5py.check_string_dtype(dtype) is not None or base in (str, bytes) or (
            isinstance(base, np.dtype) and base.kind in "SUa"):
        return "strings"
    if not isinstance(base, np.dtype) or base.kind not in "iuf":
        return f"values of type {base}"
    return None


def _to_events(times, units, path, index: int) -> np.ndarray:
    times = np.asarray(times)
    units = np.asarray(units)
    if times.ndim != 1 or units.ndim != 1 or len(times) != len(units):
        raise EventFileError(path, f"sample {index} has {times.size} spike times but {units.size} units")
    if times.dtype.kind not in "iuf" or units.dtype.kind not in "iuf":
        raise EventFileError(path, f"sample {index} holds non-numeric spike times or units")
    t_us = times.astype(np.float64) * 1e6
    if times.size and (not np.all(np.isfinite(t_us)) or t_us.min() < 0 or t_us.max() >= 2.0 ** 62):
        raise EventFileError(path, f"sample {index} has spike times that are negative or not finite")
    u = units.astype(np.float64)
    if units.size and (not np.all(np.isfinite(u)) or u.min() < 0 or u.max() > MAX_COORD or np.any(u != np.floor(u))):
        raise EventFileError(path, f"sample {index} has units that are not whole numbers in 0..{MAX_COORD}")
    ev = np.zeros(len(times), dtype=EVENT_DTYPE)
    ev["x"] = u
    ev["t"] = np.rint(t_us)
    return ev


class SHDFile:
    """An open SHD-format HDF5 file: ``len``, ``labels``, ``keys`` and ``events(i)``.

    Every problem with the file (not HDF5, missing or mismatched datasets, bad values) is
    raised as ``EventFileError``.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no such SHD file: {self.path}")
        h5py = _h5py()
        try:
            self._file = h5py.File(self.path, "r")
        except Exception:  # noqa: BLE001 - h5py raises OSError and others on a non-HDF5 file
            raise EventFileError(self.path, "it is not a readable HDF5 file") from None
        try:
            f = self._file
            for name in ("spikes/times", "spikes/units", "labels"):
                if name not in f or not isinstance(f[name], h5py.Dataset):
                    raise EventFileError(self.path, f"it has no '{name}' dataset, so it is not an SHD file")
            self._times, self._units = f["spikes/times"], f["spikes/units"]
            for name, dataset in (("spikes/times", self._times), ("spikes/units", self._units)):
                kind = _element_kind(h5py, dataset.dtype)
                if kind is not None:
                    raise EventFileError(
                        self.path, f"its '{name}' hold {kind}, not numbers (spike times in seconds, "
                        "unit indices)")
            labels = np.asarray(f["labels"][()])
            if labels.ndim != 1 or labels.dtype.kind not in "iu":
                raise EventFileError(self.path, "its 'labels' are not a list of integers")
            if not (len(labels) == len(self._times) == len(self._units)):
                raise EventFileError(
                    self.path, f"it has {len(labels)} labels, {len(self._times)} spike-time and "
                    f"{len(self._units)} unit arrays, which should be equal")
            if labels.size and (labels.min() < 0 or labels.max() > 2**31):
                raise EventFileError(self.path, "its labels are negative or too large")
            self.labels = labels.astype(np.int64)
            self.keys: tuple[str, ...] | None = None
            if "extra/keys" in f:
                keys = np.asarray(f["extra/keys"][()]).ravel()
                self.keys = tuple(k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k) for k in keys)
        except EventFileError:
            self.close()
            raise
        except Exception as exc:  # noqa: BLE001 - corrupt HDF5 surfaces as many exception types
            self.close()
            raise EventFileError(self.path, f"its HDF5 structure is damaged ({type(exc).__name__})") from None

    def __len__(self) -> int:
        return len(self.labels)

    def events(self, i: int) -> np.ndarray:
        try:
            times, units = self._times[i], self._units[i]
        except Exception as exc:  # noqa: BLE001 - corrupt HDF5 surfaces as many exception types
            raise EventFileError(self.path, f"sample {i} cannot be read ({type(exc).__name__})") from None
        return _to_events(times, units, self.path, i)

    def close(self) -> None:
        try:
            self._file.close()
        except Exception:  # noqa: BLE001 - closing a damaged file must not hide the real error
            pass

    def __enter__(self) -> "SHDFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_shd(path: str | os.PathLike) -> tuple[list[np.ndarray], np.ndarray]:
    """All samples of an SHD file: (list of event arrays, labels)."""
    with SHDFile(path) as f:
        return [f.events(i) for i in range(len(f))], f.labels


def write_shd(
    path: str | os.PathLike,
    events: Sequence[np.ndarray],
    labels: Sequence[int],
    keys: Sequence[str] | None = None,
    time_dtype: str = "f8",
) -> None:
    """Write samples in SHD's layout (times in seconds). With the default float64 times,
    ``read_shd`` gives the same microseconds back; SHD itself stores lower precision."""
    h5py = _h5py()
    if len(events) != len(labels):
        raise ValueError(f"{len(events)} samples but {len(labels)} labels")
    with h5py.File(path, "w") as f:
        times = f.create_dataset("spikes/times", (len(events),), dtype=h5py.vlen_dtype(np.dtype(time_dtype)))
        units = f.create_dataset("spikes/units", (len(events),), dtype=h5py.vlen_dtype(np.dtype("u2")))
        for i, ev in enumerate(events):
            times[i] = np.asarray(ev["t"], dtype=np.float64) / 1e6
            units[i] = np.asarray(ev["x"], dtype=np.uint16)
        f.create_dataset("labels", data=np.asarray(labels, dtype=np.uint16))
        if keys is not None:
            f.create_dataset("extra/keys", data=np.asarray([k.encode("utf-8") for k in keys]))
