"""The on-disk cache never serves stale data: keys follow the file and the transform."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from threefactor.data.cache import CachedDataset, cache_key, load_array, save_array, transform_fingerprint
from threefactor.data.events import make_events
from threefactor.data.datasets.nmnist import NMNIST
from threefactor.data.formats.nmnist_bin import write_bin
from threefactor.data.transforms import CenterCrop, Compose, Downsample, RandomTimeSlice, ToFrame


def _write_nmnist(root, n=3, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / "Train" / str(i % 10)
        d.mkdir(parents=True, exist_ok=True)
        k = 200
        ev = make_events(rng.integers(0, 34, k), rng.integers(0, 34, k), np.sort(rng.integers(0, 50_000, k)),
                         rng.integers(0, 2, k))
        write_bin(d / f"{i:05d}.bin", ev)


class Counting:
    """Wraps a dataset and counts the raw reads, to tell cache hits from misses."""

    def __init__(self, ds):
        self.ds, self.reads = ds, 0
        self.targets = ds.targets

    def __len__(self):
        return len(self.ds)

    def events(self, i):
        self.reads += 1
        return self.ds.events(i)

    def source(self, i):
        return self.ds.source(i)


def test_hit_miss_and_transform_change(tmp_path):
    _write_nmnist(tmp_path / "nm")
    ds = Counting(NMNIST(tmp_path / "nm"))
    t1 = Compose([CenterCrop((34, 34, 2), (32, 32)), ToFrame((32, 32, 2), 1000, 50)])
    cached = CachedDataset(ds, tmp_path / "cache", t1)
    x0, y0 = cached[0]
    assert ds.reads == 1 and x0.shape == (50, 2, 32, 32) and x0.dtype == np.float32
    x1, y1 = cached[0]
    assert ds.reads == 1 and y1 == y0
    np.testing.assert_array_equal(x0, x1)
    np.testing.assert_array_equal(x0, t1(ds.ds.events(0)))

    # Same class, one parameter changed: a new key, recomputed, never the old frames.
    t2 = Compose([CenterCrop((34, 34, 2), (32, 32)), ToFrame((32, 32, 2), 2000, 25)])
    reads = ds.reads
    x2, _ = CachedDataset(ds, tmp_path / "cache", t2)[0]
    assert ds.reads == reads + 1 and x2.shape == (25, 2, 32, 32)
    np.testing.assert_array_equal(x2, t2(ds.ds.events(0)))
    assert cache_key(ds.source(0), t1) != cache_key(ds.source(0), t2)
    assert transform_fingerprint(t1) == transform_fingerprint(
        Compose([CenterCrop((34, 34, 2), (32, 32)), ToFrame((32, 32, 2), 1000, 50)]))
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_changed_source_file_is_recomputed(tmp_path):
    _write_nmnist(tmp_path / "nm", n=1)
    ds = NMNIST(tmp_path / "nm")
    t = ToFrame((34, 34, 2), 1000, 50)
    cached = CachedDataset(ds, tmp_path / "cache", t)
    old, _ = cached[0]
    # Rewrite the recording with different events (and a later mtime).
    ev = make_events([1, 2, 3], [4, 5, 6], [100, 200, 300], [1, 1, 0])
    write_bin(ds.files[0], ev)
    st = os.stat(ds.files[0])
    os.utime(ds.files[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    new, _ = cached[0]
    assert new.sum() == 3 and old.sum() != 3
    np.testing.assert_array_equal(new, t(ev))


def test_random_or_unkeyable_transforms_are_refused(tmp_path):
    _write_nmnist(tmp_path / "nm", n=1)
    ds = NMNIST(tmp_path / "nm")
    with pytest.raises(TypeError, match="random"):
        CachedDataset(ds, tmp_path / "c", Compose([RandomTimeSlice(1000, 0), ToFrame((34, 34, 2))]))
    with pytest.raises(TypeError, match="dataclass"):
        CachedDataset(ds, tmp_path / "c", lambda ev: ev)
    # Random augmentation after the cache is fine; raw events can be cached (transform=None).
    cached = CachedDataset(ds, tmp_path / "c", None,
                           post_transform=Compose([RandomTimeSlice(10_000, 0), ToFrame((34, 34, 2), 1000, 10)]))
    x, _ = cached[0]
    assert x.shape == (10, 2, 34, 34)
    raw = cached.load(0)
    np.testing.assert_array_equal(raw, ds.events(0))


def test_code_change_changes_fingerprint(monkeypatch):
    import threefactor.data.cache as cache

    before = transform_fingerprint(Downsample(4))
    cache._module_code_hash.cache_clear()
    monkeypatch.setattr(cache.inspect, "getsource", lambda m: "edited source")
    assert transform_fingerprint(Downsample(4)) != before
    cache._module_code_hash.cache_clear()


@dataclass(frozen=True)
class ToTensorFrames:
    sensor_size: tuple = (34, 34, 2)

    def __call__(self, ev):
        return torch.from_numpy(ToFrame(self.sensor_size, 1000, 20)(ev))


def test_tensor_results_and_damaged_entries(tmp_path):
    _write_nmnist(tmp_path / "nm", n=1)
    ds = NMNIST(tmp_path / "nm")
    cached = CachedDataset(ds, tmp_path / "c", ToTensorFrames())
    a, _ = cached[0]
    b, _ = cached[0]
    assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    path = cached.path(0)
    path.write_bytes(b"damaged")
    c, _ = cached[0]
    assert torch.equal(a, c) and load_array(path) is not None


def test_sparse_and_dense_storage_round_trip(tmp_path):
    sparse = np.zeros((30, 2, 8, 8), dtype=np.float32)
    sparse[3, 1, 2, 5] = 4
    dense = np.arange(12, dtype=np.int16).reshape(3, 4)
    for arr in (sparse, dense, np.zeros((0, 3)), make_events([1], [2], [3], [1])):
        save_array(tmp_path / "a.npz", arr)
        got, kind = load_array(tmp_path / "a.npz")
        assert kind == "numpy" and got.dtype == arr.dtype
        np.testing.assert_array_equal(got, arr)
    save_array(tmp_path / "s.npz", sparse)
    assert (tmp_path / "s.npz").stat().st_size < sparse.nbytes / 10


def test_parts_of_one_file_get_their_own_entries(tmp_path):
    from threefactor.data.datasets.dvs_gesture import DVSGesture
    from threefactor.data.formats import aedat, label_csv

    rng = np.random.default_rng(5)
    d = tmp_path / "DvsGesture"
    d.mkdir()
    ev = make_events(rng.integers(0, 128, 400), rng.integers(0, 128, 400), np.sort(rng.integers(0, 10**6, 400)),
                     rng.integers(0, 2, 400))
    aedat.write_aedat(d / "user03_led.aedat", ev)
    label_csv.write_labels_csv(d / "user03_led_labels.csv", [(1, 0, 400_000), (2, 500_000, 900_000)])
    ds = DVSGesture(tmp_path, "train")
    t = Compose([Downsample(4), ToFrame((32, 32, 2), 1000, 400)])
    cached = CachedDataset(ds, tmp_path / "cache", t)
    assert cached.path(0) != cached.path(1)
    for i in range(2):
        np.testing.assert_array_equal(cached[i][0], t(ds.events(i)))
        assert cached[i][1] == ds.targets[i]
