"""On-disk cache of transformed samples (e.g. binned frames), safe against stale data.

A cache entry's key hashes (1) the source file's absolute path, size, mtime and a digest of its
content (all of it for files up to ``WHOLE_FILE_DIGEST_BYTES``, else its first and last
``DIGEST_BLOCK_BYTES`` and evenly spaced blocks between), plus the part of it a sample is (a
gesture's time span, an SHD row) and the sensor check it passed, and (2) the transform's
fingerprint: its class, every dataclass field (recursively, so ``Compose`` of dataclasses works)
and a hash of the source code of the module that defines it. Changing the recording (even in
place, keeping its size and mtime), a parameter, or the transform's code therefore changes the
key; nothing is ever looked up by index alone (the way stale caches happen). Every entry stores
its full key and is used only when that matches, so an entry copied over another is a miss,
not a wrong sample. Entries are written to a uniquely named temporary file and renamed into
place, so a crash or two workers writing the same entry never leave a half-written file behind.

Random transforms (``RandomTimeSlice``) cannot be cached: pass them as ``post_transform``,
applied after the cache. Entries are stored sparsely when the data is mostly zeros (event
frames are), which keeps an N-MNIST sample at tens of kB instead of 2.4 MB.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import io
import json
import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..atomic import write_atomic

CACHE_FORMAT = 2
# Files up to this size are hashed whole; larger ones by blocks (first, last, spaced between).
WHOLE_FILE_DIGEST_BYTES = 4 * 2**20
DIGEST_BLOCK_BYTES = 64 * 2**10
DIGEST_MIDDLE_BLOCKS = 14


@lru_cache(maxsize=None)
def _module_code_hash(module_name: str) -> str:
    module = sys.modules.get(module_name)
    try:
        text = inspect.getsource(module) if module is not None else module_name
    except (OSError, TypeError):
        text = module_name
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _fingerprint(obj: Any) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if isinstance(obj, (list, tuple)):
        return [_fingerprint(o) for o in obj]
    if isinstance(obj, dict):
        return {str(k): _fingerprint(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, np.ndarray):
        return {"ndarray": hashlib.sha256(np.ascontiguousarray(obj).tobytes()).hexdigest(),
                "dtype": str(obj.dtype), "shape": list(obj.shape)}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        cls = type(obj)
        if getattr(obj, "random", False):
            raise TypeError(
                f"{cls.__name__} is random, so its output cannot be cached; pass it as post_transform")
        return {
            "class": f"{cls.__module__}.{cls.__qualname__}",
            "code": _module_code_hash(cls.__module__),
            "fields": {f.name: _fingerprint(getattr(obj, f.name))
                       for f in dataclasses.fields(obj) if f.compare},
        }
    raise TypeError(
        f"cannot fingerprint {obj!r}: a cached transform must be a dataclass (frozen, with all "
        "its parameters as fields) or a composition of them, so that a change in it is seen")


def transform_fingerprint(transform: Callable | None) -> str:
    """Canonical JSON of what decides ``transform``'s output (TypeError if that is not knowable)."""
    return json.dumps(_fingerprint(transform), sort_keys=True, separators=(",", ":"))


# Digests already computed in this process, by everything stat says about the file: ctime
# changes on any write (and cannot be set back), so an in-place edit is hashed again.
_digests: dict[tuple, str] = {}


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's content: all of it when small, else its size and sampled blocks."""
    st = os.stat(path)
    memo = (os.path.abspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    digest = _digests.get(memo)
    if digest is not None:
        return digest
    h = hashlib.sha256(str(st.st_size).encode())
    with open(path, "rb") as f:
        if st.st_size <= WHOLE_FILE_DIGEST_BYTES:
            h.update(f.read())
        else:
            last = st.st_size - DIGEST_BLOCK_BYTES
            step = last // (DIGEST_MIDDLE_BLOCKS + 1)
            for offset in [0, *(step * k for k in range(1, DIGEST_MIDDLE_BLOCKS + 1)), last]:
                f.seek(offset)
                h.update(f.read(DIGEST_BLOCK_BYTES))
    digest = h.hexdigest()
    if len(_digests) > 100_000:  # a bound for very long-lived processes
        _digests.clear()
    _digests[memo] = digest
    return digest


def cache_key_text(source: tuple[str, Any], transform: Callable | None, checks: Any = None) -> str:
    """Canonical JSON of everything that decides a cached sample: the source file (path, size,
    mtime, content digest) and part, the ``checks`` it passed, and the transform."""
    path, part = source
    st = os.stat(path)
    payload = {
        "format": CACHE_FORMAT,
        "path": os.path.abspath(path),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "content": file_digest(path),
        "part": _fingerprint(part),
        "checks": _fingerprint(checks),
        "transform": transform_fingerprint(transform),
    }
    return json.dumps(payload, sort_keys=True)


def cache_key(source: tuple[str, Any], transform: Callable | None, checks: Any = None) -> str:
    """Hex key of a sample read from ``source`` = (path, part) and passed through ``transform``."""
    return hashlib.sha256(cache_key_text(source, transform, checks).encode()).hexdigest()


def save_array(path: str | os.PathLike, array: np.ndarray, kind: str = "numpy", key: str = "") -> None:
    """Write ``array`` atomically (temp file + os.replace); numeric arrays that are under a
    third non-zero are stored as (index, value) pairs. ``kind`` and ``key`` are stored with it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields: dict[str, np.ndarray] = {"kind": np.asarray(kind)}
    if key:
        fields["key"] = np.asarray(key)
    if array.dtype.names is None and array.dtype.kind in "biuf" and array.size:
        flat = array.reshape(-1)
        nz = np.flatnonzero(flat)
    else:
        nz = None
    if nz is not None and nz.size * 3 < array.size:
        fields.update(shape=np.asarray(array.shape, dtype=np.int64), index=nz.astype(np.int64),
                      values=flat[nz], dtype=np.asarray(str(array.dtype)))
    else:
        fields["dense"] = array
    buf = io.BytesIO()
    np.savez(buf, **fields)
    write_atomic(path, buf.getvalue())


def load_array(path: str | os.PathLike, key: str | None = None) -> tuple[np.ndarray, str] | None:
    """(array, kind) stored at ``path``, or None when missing, unreadable or stored under
    another ``key`` than the one given (then recompute)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if key is not None and ("key" not in z.files or str(z["key"]) != key):
                return None
            kind = str(z["kind"])
            if "dense" in z.files:
                return z["dense"], kind
            shape = tuple(int(s) for s in z["shape"])
            out = np.zeros(shape, dtype=np.dtype(str(z["dtype"])))
            out.reshape(-1)[z["index"]] = z["values"]
            return out, kind
    except Exception:  # noqa: BLE001 - a damaged entry is a miss, not a failure
        return None


class CachedDataset(torch.utils.data.Dataset):
    """``dataset`` with ``transform`` applied once per sample and kept on disk in ``cache_dir``.

    ``dataset`` must provide ``events(i)`` (raw events) and ``source(i)`` (path, part) and
    ``targets``, as the datasets in ``threefactor.data`` do; its own ``transform`` is ignored.
    Events are checked against the dataset's sensor (``checked_events``) before the transform.
    ``transform=None`` caches the raw events themselves (worth it when decoding is the slow
    part, as with long AEDAT recordings); then ``post_transform`` can slice them at random
    and bin. ``post_transform`` runs after the cache on every access.
    Samples come back as numpy arrays, or torch tensors when ``transform`` returns tensors.
    """

    def __init__(
        self,
        dataset,
        cache_dir: str | os.PathLike,
        transform: Callable | None,
        post_transform: Callable | None = None,
    ) -> None:
        self.dataset = dataset
        self.cache_dir = Path(cache_dir)
        self.transform = transform
        self.post_transform = post_transform
        transform_fingerprint(transform)  # fail now, not in a worker, if it cannot be keyed
        self.targets = dataset.targets
        self.classes = getattr(dataset, "classes", None)
        self.sensor_size = getattr(dataset, "sensor_size", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def _checks(self) -> Any:
        """The sensor check a sample passes before its transform (it decides what is dropped)."""
        if not hasattr(self.dataset, "checked_events"):
            return None
        return {"sensor": list(self.dataset.sensor_size), "outside_sensor": self.dataset.outside_sensor}

    def _key_text(self, i: int) -> str:
        return cache_key_text(self.dataset.source(i), self.transform, self._checks())

    def path(self, i: int) -> Path:
        key = hashlib.sha256(self._key_text(i).encode()).hexdigest()
        return self.cache_dir / key[:2] / f"{key}.npz"

    def _events(self, i: int) -> np.ndarray:
        if hasattr(self.dataset, "checked_events"):
            return self.dataset.checked_events(i)[0]
        return self.dataset.events(i)

    def load(self, i: int):
        """Sample ``i`` after ``transform``: from the cache, or computed and stored."""
        key_text = self._key_text(i)
        key = hashlib.sha256(key_text.encode()).hexdigest()
        path = self.cache_dir / key[:2] / f"{key}.npz"
        entry = load_array(path, key_text)
        if entry is None:
            events = self._events(i)
            out = self.transform(events) if self.transform is not None else events
            kind = "torch" if isinstance(out, torch.Tensor) else "numpy"
            data = out.numpy() if kind == "torch" else np.asarray(out)
            save_array(path, data, kind, key_text)
        else:
            data, kind = entry
        return torch.from_numpy(data) if kind == "torch" else data

    def __getitem__(self, i: int):
        x = self.load(i)
        if self.post_transform is not None:
            x = self.post_transform(x)
        return x, int(self.targets[i])
