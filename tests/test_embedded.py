"""The embedded motion dataset: deterministic, balanced, well-formed, fast, and pair-symmetric."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from threefactor.data.datasets.base import EventDataset
from threefactor.data.datasets.embedded import MotionDataset
from threefactor.data.synthetic.motion import MOTION_CLASSES, MotionSpec, make_motion_dataset
from threefactor.data.events import EVENT_DTYPE
from threefactor.data.transforms import to_frame

SMALL = MotionSpec(timesteps=20)


@pytest.fixture(scope="module")
def large():
    """200 recordings of the default spec, and how long they took to make."""
    t0 = time.perf_counter()
    events, labels = make_motion_dataset(200, 5)
    return events, labels, time.perf_counter() - t0


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b))


def test_same_seed_same_events_different_seed_different_events():
    ev1, lab1 = make_motion_dataset(12, 3, SMALL)
    ev2, lab2 = make_motion_dataset(12, 3, SMALL)
    ev3, lab3 = make_motion_dataset(12, 4, SMALL)
    assert _same(ev1, ev2) and np.array_equal(lab1, lab2)
    assert not _same(ev1, ev3)
    # no recording of one seed reappears in the other
    assert not any(np.array_equal(a, b) for a in ev1 for b in ev3)


@pytest.mark.parametrize("n", [8, 16, 20, 37])
def test_classes_are_balanced(n):
    _, labels = make_motion_dataset(n, 1, MotionSpec(timesteps=4))
    counts = np.bincount(labels, minlength=len(MOTION_CLASSES))
    assert len(labels) == n and counts.sum() == n
    assert counts.max() - counts.min() <= 1
    assert set(np.unique(labels)) <= set(range(len(MOTION_CLASSES)))


def test_labels_are_shuffled():
    _, labels = make_motion_dataset(32, 2, MotionSpec(timesteps=4))
    assert not np.array_equal(labels, np.arange(32) % 8)


def test_events_are_well_formed(large):
    events, labels, _ = large
    T = MotionSpec().timesteps
    assert len(events) == len(labels) == 200
    for ev in events:
        assert ev.dtype == EVENT_DTYPE
        assert len(ev) > 100
        assert ev["x"].min() >= 0 and ev["x"].max() < 32
        assert ev["y"].min() >= 0 and ev["y"].max() < 32
        assert ev["t"].min() >= 0 and ev["t"].max() < T * 1000
        assert np.all(np.diff(ev["t"]) >= 0)  # sorted by time
        assert set(np.unique(ev["p"])) == {0, 1}  # both polarities
    # events span the recording, not only its start
    assert max(ev["t"].max() for ev in events) >= (T - 1) * 1000


def test_two_hundred_samples_take_a_few_seconds(large):
    assert large[2] < 15.0, f"{large[2]:.1f} s"


def test_dataset_frames_split_and_items():
    train = MotionDataset("train", 16, seed=7, spec=SMALL)
    test = MotionDataset("test", 16, seed=7, spec=SMALL)
    frames, label = train[3]
    assert frames.shape == (20, 2, 32, 32) and frames.dtype == np.float32
    assert label == int(train.targets[3])
    # every event lands in some frame (times lie within the recording)
    assert frames.sum() == len(train.events(3))
    assert len(train) == 16 and train.classes == MOTION_CLASSES
    # train and test share no recording
    assert not any(np.array_equal(train.events(i), test.events(j)) for i in range(16) for j in range(16))
    with pytest.raises(ValueError, match="split"):
        MotionDataset("val", 4, spec=SMALL)


def test_the_dataset_is_an_event_dataset_whose_sources_name_each_recording():
    """Checked events, sources a cache can key on: the generator's file, and what each recording
    was made from (so no two recordings of two splits or seeds share a source)."""
    train = MotionDataset("train", 8, seed=7, spec=SMALL)
    assert isinstance(train, EventDataset)
    events, dropped = train.checked_events(5)
    assert dropped == 0 and np.array_equal(events, train.events(5))
    path, _ = train.source(0)
    assert Path(path).is_file()
    others = (MotionDataset("test", 8, seed=7, spec=SMALL), MotionDataset("train", 8, seed=8, spec=SMALL))
    sources = [repr(ds.source(i)) for ds in (train, *others) for i in range(8)]
    assert len(set(sources)) == len(sources)


# --- the time-reversal symmetry of the module docstring ------------------------------------


def _features(events: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Statistics of the time-summed count images (nothing about the order of events)."""
    T = MotionSpec().timesteps
    counts = np.stack([to_frame(e, (32, 32, 2), 1000, T).sum(0) for e in events]).astype(np.float64)
    img = counts.sum(1)
    total = img.sum((1, 2))
    yy, xx = np.mgrid[0:32, 0:32]
    radius = np.hypot(xx - 15.5, yy - 15.5)
    gx = (np.diff(img, axis=2) ** 2).sum((1, 2))
    gy = (np.diff(img, axis=1) ** 2).sum((1, 2))
    return {
        "log_total": np.log(total),  # how many events
        "on_fraction": counts[:, 1].sum((1, 2)) / total,
        "radial": (img * radius).sum((1, 2)) / total,  # where: centre or periphery
        "anisotropy": np.log(gx / gy),  # smearing along x versus along y
    }


def _welch_t(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.mean() - b.mean()) / np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)))


def test_time_reversed_pairs_have_the_same_count_image_statistics(large):
    """A class and its time-reversed partner (right/left, up/down, ccw/cw, expand/contract) cannot
    be told apart by statistics of their time-summed count images."""
    events, labels, _ = large
    feats = _features(events)
    for name, f in feats.items():
        for k in range(4):
            t = _welch_t(f[labels == 2 * k], f[labels == 2 * k + 1])
            assert abs(t) < 4.0, (name, MOTION_CLASSES[2 * k], MOTION_CLASSES[2 * k + 1], t)


def test_the_same_statistics_do_tell_different_pairs_apart(large):
    """The statistics above have power: they separate pairs that differ in their count images."""
    events, labels, _ = large
    f = _features(events)
    horizontal, vertical = labels < 2, (labels >= 2) & (labels < 4)
    translation, other = labels < 4, labels >= 4
    rotation, scaling = (labels >= 4) & (labels < 6), labels >= 6
    assert abs(_welch_t(f["anisotropy"][horizontal], f["anisotropy"][vertical])) > 10
    assert abs(_welch_t(f["radial"][translation], f["radial"][other])) > 6
    assert abs(_welch_t(f["log_total"][rotation], f["log_total"][scaling])) > 6


def test_on_and_off_events_are_balanced_in_every_class(large):
    """The texture is symmetric in sign, so each class has as many ON as OFF events on average."""
    events, labels, _ = large
    on = _features(events)["on_fraction"]
    for c in range(8):
        assert abs(on[labels == c].mean() - 0.5) < 0.03, MOTION_CLASSES[c]
