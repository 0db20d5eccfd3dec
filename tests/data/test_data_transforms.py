"""Event transforms: properties against frames and against Tonic's Denoise loop."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from data_helpers import assert_valid_events, events
from hypothesis import given, settings
from hypothesis import strategies as st

from threefactor.data.events import make_events
from threefactor.data.transforms import (
    CenterCrop, Compose, Crop, Denoise, Downsample, MergePolarities, RandomTimeSlice, TimeWindow,
    ToFrame, denoise, sum_pool, to_frame,
)

PROPS = settings(max_examples=40, deadline=None)


@PROPS
@given(events(max_n=100, max_xy=127))
def test_downsample_is_summing_blocks(ev):
    full = to_frame(ev, (128, 128, 2), 1000, n_bins=8)
    small = Compose([Downsample(4), ToFrame((32, 32, 2), 1000, 8)])(ev)
    np.testing.assert_array_equal(small, sum_pool(full, 4))
    assert small.sum() == full.sum()


@PROPS
@given(events(max_n=100, max_xy=33))
def test_center_crop_34_to_32(ev):
    full = to_frame(ev, (34, 34, 2), 1000, n_bins=4)
    cropped = ToFrame((32, 32, 2), 1000, 4)(CenterCrop((34, 34, 2), (32, 32))(ev))
    np.testing.assert_array_equal(cropped, full[..., 1:33, 1:33])


@PROPS
@given(events(max_n=60, max_xy=40), st.integers(0, 40), st.integers(0, 40), st.integers(1, 20), st.integers(1, 20))
def test_crop_keeps_exactly_the_box(ev, x0, y0, w, h):
    out = Crop(x0, y0, w, h)(ev)
    assert_valid_events(out)
    inside = (ev["x"] >= x0) & (ev["x"] < x0 + w) & (ev["y"] >= y0) & (ev["y"] < y0 + h)
    assert len(out) == inside.sum()
    if len(out):
        assert out["x"].max() < w and out["y"].max() < h
    np.testing.assert_array_equal(out["t"], ev["t"][inside])


@PROPS
@given(events(max_n=80, max_xy=15, max_dt=3000), st.integers(1, 40), st.integers(0, 30))
def test_time_window_matches_bins(ev, duration_ms, start_ms):
    out = TimeWindow(duration_ms * 1000, start_ms * 1000)(ev)
    frames = to_frame(ev, (16, 16, 2), 1000, start_ms + duration_ms)
    np.testing.assert_array_equal(to_frame(out, (16, 16, 2), 1000, duration_ms), frames[start_ms:])


@PROPS
@given(events(max_n=80, max_dt=3000), st.integers(1, 50_000), st.integers(0, 2**32))
def test_random_time_slice_always_fits(ev, duration, seed):
    out = RandomTimeSlice(duration, seed=seed)(ev)
    assert_valid_events(out)
    assert len(out) <= len(ev)
    if len(out):
        assert out["t"].min() >= 0 and out["t"].max() < duration
    if len(ev):
        span = int(ev["t"].max() - ev["t"].min())
        if span < duration:  # shorter than the window: the whole recording, from its first event
            assert len(out) == len(ev) and out["t"].min() == 0
    again = RandomTimeSlice(duration, seed=seed)(ev)
    np.testing.assert_array_equal(out, again)  # a seed makes it reproducible


def test_random_time_slice_covers_starts_and_accepts_generator():
    # One event per ms for 1 s; x holds the event's index, so a slice's first x is its start.
    ev = make_events(np.arange(1001), np.zeros(1001), np.arange(1001) * 1000, np.zeros(1001))
    t = RandomTimeSlice(500_000, seed=np.random.default_rng(3))
    firsts = {int(t(ev)["x"][0]) for _ in range(200)}
    assert len(firsts) > 50 and min(firsts) >= 0 and max(firsts) <= 501  # starts spread over [0, 501 ms]
    assert all(len(t(ev)) == 500 for _ in range(20))  # every window lies fully inside the recording
    assert getattr(t, "random", False)


@PROPS
@given(events(max_n=50))
def test_merge_polarities(ev):
    out = MergePolarities()(ev)
    assert (out["p"] == 0).all() and len(out) == len(ev)
    np.testing.assert_array_equal(to_frame(out, (128, 128, 1), 1000, 5).sum(1),
                                  to_frame(ev, (128, 128, 2), 1000, 5).sum(1))


def _denoise_reference(ev, filter_time):
    """Tonic's loop, with an empty memory at the start instead of Tonic's t = 0 for every pixel."""
    width, height = int(ev["x"].max()) + 1, int(ev["y"].max()) + 1
    memory = np.full((width, height), -np.inf)
    keep = []
    for e in ev:
        x, y, t = int(e["x"]), int(e["y"]), int(e["t"])
        memory[x, y] = t + filter_time
        keep.append(
            (x > 0 and memory[x - 1, y] > t) or (x < width - 1 and memory[x + 1, y] > t)
            or (y > 0 and memory[x, y - 1] > t) or (y < height - 1 and memory[x, y + 1] > t))
    return ev[np.asarray(keep, dtype=bool)]


@PROPS
@given(events(max_n=120, max_xy=6, max_dt=300), st.integers(1, 3000))
def test_denoise_matches_tonic_loop(ev, filter_time):
    if len(ev) == 0:
        assert len(Denoise(filter_time)(ev)) == 0
        return
    np.testing.assert_array_equal(denoise(ev, filter_time), _denoise_reference(ev, filter_time))


def test_denoise_drops_isolated_noise():
    rng = np.random.default_rng(0)
    # A moving edge (neighbouring events close in time) plus sparse random noise.
    t = np.arange(200) * 100
    edge = make_events(np.arange(200) % 20, np.full(200, 5), t, np.ones(200))
    noise = make_events(rng.integers(0, 64, 30), rng.integers(20, 64, 30), rng.integers(0, 20_000, 30), np.zeros(30))
    ev = np.concatenate([edge, noise])
    ev = ev[np.argsort(ev["t"], kind="stable")]
    out = Denoise(1000)(ev)
    assert (out["y"] == 5).sum() >= 190 and (out["y"] >= 20).sum() <= 3


def test_transforms_are_frozen_dataclasses_with_full_repr():
    for t in (Downsample(4), Crop(1, 1, 32, 32), CenterCrop((34, 34, 2), (32, 32)), TimeWindow(1000),
              MergePolarities(), Denoise(5000), RandomTimeSlice(500, seed=1)):
        assert dataclasses.is_dataclass(t)
        with pytest.raises(dataclasses.FrozenInstanceError):
            t.x = 1
    assert repr(RandomTimeSlice(500, seed=1)) == "RandomTimeSlice(duration_us=500, seed=1)"


def test_transforms_do_not_modify_their_input():
    ev = make_events([5, 6], [5, 7], [10, 20], [0, 1])
    before = ev.copy()
    for t in (Downsample(2), Crop(1, 1, 10, 10), TimeWindow(15, 5), MergePolarities(), Denoise(100),
              RandomTimeSlice(5, seed=0)):
        t(ev)
    np.testing.assert_array_equal(ev, before)
