"""Datasets: layouts, splits, labels, clear errors; on small files written in the real formats."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_helpers import assert_valid_events

from threefactor.data.formats import aedat, label_csv, npy_events, shd_hdf5
from threefactor.errors import DatasetNotFoundError
from threefactor.data.events import make_events
from threefactor.data.datasets.dvs_gesture import DVSGesture
from threefactor.data.datasets.folder import EventFolder
from threefactor.data.datasets.nmnist import NMNIST
from threefactor.data.datasets.shd import SHD
from threefactor.data.datasets.simulated_nmnist import SimulatedNMNIST
from threefactor.data.formats.nmnist_bin import write_bin
from threefactor.data.synthetic.saccades import SaccadeSpec, saccade_path, simulate_saccades
from threefactor.data.transforms import CenterCrop, Compose, Downsample, TimeWindow, ToFrame


def _random_events(rng, n, size, t_max):
    return make_events(rng.integers(0, size, n), rng.integers(0, size, n), np.sort(rng.integers(0, t_max, n)),
                       rng.integers(0, 2, n))


# --------------------------------------------------------------------------- N-MNIST

@pytest.mark.shared_data
def test_nmnist_real_layout(shared_data):
    root = shared_data / "nmnist-small"
    train, test = NMNIST(root, "train"), NMNIST(root, "test")
    assert len(train) == 1000 and len(test) == 100
    assert np.bincount(train.targets).tolist() == [97, 116, 99, 93, 105, 92, 94, 117, 87, 100]
    assert np.bincount(test.targets).tolist() == [8, 14, 8, 11, 14, 7, 10, 15, 2, 11]
    ds = NMNIST(root, "test", transform=Compose([CenterCrop((34, 34, 2), (32, 32)), ToFrame((32, 32, 2), 1000, 300)]))
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    x, y = next(iter(loader))
    assert x.shape == (4, 300, 2, 32, 32) and y.tolist() == [0, 0, 0, 0]
    first = NMNIST(root, "test", first_saccade_only=True)
    assert first.events(0)["t"].max() < 100_000


def test_nmnist_missing_names_where_and_how(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        NMNIST(tmp_path, "test")
    msg = str(info.value)
    assert str(tmp_path / "Test") in msg and "download=True" in msg and msg.count(". ") == 0
    with pytest.raises(ValueError):
        NMNIST(tmp_path, "validation")


# --------------------------------------------------------------------------- DVS Gesture

def _write_gesture_aedat(folder, user, rng, n_gestures=3):
    """One recording with ``n_gestures`` labelled spans, written as AEDAT 3.1 + labels csv."""
    folder.mkdir(parents=True, exist_ok=True)
    ev = _random_events(rng, 3000, 128, 3_000_000)
    name = f"user{user:02d}_fluorescent"
    aedat.write_aedat(folder / f"{name}.aedat", ev, packet_size=500)
    rows = [(k + 1, 200_000 + k * 900_000, 900_000 + k * 900_000) for k in range(n_gestures)]
    label_csv.write_labels_csv(folder / f"{name}_labels.csv", rows)
    return ev, rows


def test_dvsgesture_aedat_layout(tmp_path):
    rng = np.random.default_rng(0)
    ev1, rows = _write_gesture_aedat(tmp_path / "DvsGesture", 1, rng)
    _write_gesture_aedat(tmp_path / "DvsGesture", 2, rng, n_gestures=2)
    _write_gesture_aedat(tmp_path / "DvsGesture", 24, rng)
    train = DVSGesture(tmp_path, "train")
    test = DVSGesture(tmp_path, "test")
    assert train.layout == "aedat" and len(train) == 5 and len(test) == 3
    assert train.targets.tolist() == [0, 1, 2, 0, 1]
    cls, start, end = rows[1]
    got = train.events(1)
    assert_valid_events(got)
    want = ev1[(ev1["t"] >= start) & (ev1["t"] < end)]
    np.testing.assert_array_equal(got["t"], want["t"] - start)
    np.testing.assert_array_equal(got["x"], want["x"])
    frames, label = DVSGesture(tmp_path, "train", transform=Compose([
        TimeWindow(500_000), Downsample(4), ToFrame((32, 32, 2), 1000, 500)]))[1]
    assert frames.shape == (500, 2, 32, 32) and label == 1
    assert frames.sum() == (got["t"] < 500_000).sum()
    # An explicit trial list overrides the user-number split.
    (tmp_path / "DvsGesture" / "trials_to_train.txt").write_text("user24_fluorescent.aedat\n")
    assert len(DVSGesture(tmp_path, "train")) == 3


def test_dvsgesture_npy_layout(tmp_path):
    rng = np.random.default_rng(1)
    for rec in ("user01_led", "user02_natural"):
        d = tmp_path / "ibmGestureTrain" / rec
        d.mkdir(parents=True)
        for label in (0, 10, 2):
            ev = _random_events(rng, 100, 128, 1_000_000)
            ev["t"] = ev["t"] // 1000 * 1000
            npy_events.write_gesture_npy(d / f"{label}.npy", ev)
    ds = DVSGesture(tmp_path, "train")
    assert ds.layout == "npy" and len(ds) == 6 and ds.targets.tolist() == [0, 2, 10, 0, 2, 10]
    ev, label = ds[1]
    assert_valid_events(ev) and label == 2
    with pytest.raises(DatasetNotFoundError) as info:
        DVSGesture(tmp_path, "test")
    assert "ibmGestureTest" in str(info.value) and "DvsGesture" in str(info.value)


# --------------------------------------------------------------------------- SHD

def test_shd_dataset(tmp_path):
    rng = np.random.default_rng(2)
    samples = []
    for _ in range(5):
        ev = _random_events(rng, 200, 700, 1_000_000)
        ev["y"], ev["p"] = 0, 0
        samples.append(ev)
    shd_hdf5.write_shd(tmp_path / "shd_test.h5", samples, [3, 1, 4, 1, 5], keys=[f"c{i}" for i in range(20)])
    ds = SHD(tmp_path, "test", transform=ToFrame((700, 1, 1), 10_000, 100))
    assert len(ds) == 5 and ds.classes[3] == "c3" and ds.targets.tolist() == [3, 1, 4, 1, 5]
    x, y = ds[2]
    assert x.shape == (100, 1, 1, 700) and x.sum() == 200 and y == 4
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    assert sum(len(b[1]) for b in loader) == 5
    with pytest.raises(DatasetNotFoundError, match="shd_train.h5"):
        SHD(tmp_path, "train")


# --------------------------------------------------------------------------- your own folder

def test_event_folder_class_subfolders_mixed_formats(tmp_path):
    rng = np.random.default_rng(3)
    (tmp_path / "wave").mkdir()
    (tmp_path / "clap" / "session2").mkdir(parents=True)
    aedat.write_aedat(tmp_path / "wave" / "a.aedat", _random_events(rng, 50, 64, 10_000))
    np.save(tmp_path / "wave" / "b.npy", _random_events(rng, 50, 64, 10_000))
    write_bin(tmp_path / "clap" / "session2" / "c.bin", _random_events(rng, 50, 30, 10_000))
    ds = EventFolder(tmp_path)
    assert ds.classes == ("clap", "wave") and ds.targets.tolist() == [0, 1, 1]
    assert ds.sensor_size[2] == 2 and ds.sensor_size[0] <= 64
    for i in range(len(ds)):
        assert_valid_events(ds[i][0])


def test_event_folder_labels_csv_and_segments(tmp_path):
    rng = np.random.default_rng(4)
    ev = _random_events(rng, 500, 32, 100_000)
    aedat.write_aedat(tmp_path / "long.aedat", ev)
    (tmp_path / "long_labels.csv").write_text("class,startTime_usec,endTime_usec\nup,0,40000\ndown,50000,90000\n")
    ds = EventFolder(tmp_path, sensor_size=(32, 32, 2), classes=["down", "up", "left"])
    assert ds.targets.tolist() == [1, 0] and ds[1][0]["t"].max() < 40_000

    other = tmp_path / "listed"
    other.mkdir()
    for k in range(3):
        np.save(other / f"r{k}.npy", _random_events(rng, 20, 16, 1000))
    (other / "labels.csv").write_text("file,label\nr0.npy,10\nr1.npy,2\nr2.npy,10\n")
    ds2 = EventFolder(other)
    assert ds2.classes == ("2", "10") and ds2.targets.tolist() == [1, 0, 1]


def test_event_folder_unlabelled_file_is_a_clear_error(tmp_path):
    np.save(tmp_path / "lonely.npy", make_events([1], [1], [1], [1]))
    with pytest.raises(ValueError, match="has no label"):
        EventFolder(tmp_path)


# --------------------------------------------------------------------------- saccade simulator

def test_saccade_path_is_a_closed_triangle():
    times, pos = saccade_path(SaccadeSpec())
    assert times[0] == 0 and times[-1] == SaccadeSpec().duration_us
    np.testing.assert_allclose(pos[0], pos[-1])
    assert pos.min() >= 0 and pos.max() <= 6  # the 28-pixel digit stays on the 34-pixel sensor


def test_simulated_saccades_look_like_nmnist():
    img = np.zeros((2, 28, 28), dtype=np.uint8)
    img[:, 6:22, 12:16] = 255  # a "1"
    evs = simulate_saccades(img, SaccadeSpec(), np.random.default_rng(0))
    for ev in evs:
        assert_valid_events(ev)
        assert ev["x"].max() <= 33 and ev["y"].max() <= 33
        assert np.all(np.diff(ev["t"]) >= 0) and ev["t"].max() < SaccadeSpec().duration_us
        assert set(np.unique(ev["p"])) == {0, 1}
        # Events in each of the three saccades.
        assert all(((ev["t"] >= k * 100_000) & (ev["t"] < (k + 1) * 100_000)).sum() > 50 for k in range(3))


@pytest.mark.shared_data
def test_simulated_nmnist_dataset(mnist_dir, shared_data):
    ds = SimulatedNMNIST(mnist_dir, "train", n=3, transform=ToFrame((34, 34, 2), 1000, 300))
    assert len(ds) == 3 and ds.targets.tolist() == [5, 0, 4]
    x, y = ds[1]
    assert x.shape == (300, 2, 34, 34) and y == 0
    np.testing.assert_array_equal(ds.events(1), ds.events(1))  # the same recording on every access
    # Event counts of the same order as the real recordings of the same digits (1,069..7,152).
    n = [len(ds.events(i)) for i in range(3)]
    assert all(1000 < k < 8000 for k in n)


def test_dvs_gesture_names_every_class_its_label_files_number():
    """Label files number the classes 1..GESTURE_CLASS_COUNT; each number has a class name."""
    assert len(DVSGesture.classes) == label_csv.GESTURE_CLASS_COUNT
