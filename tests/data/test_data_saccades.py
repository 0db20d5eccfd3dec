"""The saccade simulator's timing and the pixel model's starting references, as calibrated
against the real N-MNIST recordings (docs/sim2real.md)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from threefactor.data.synthetic.pixel_model import PixelModel, video_to_events
from threefactor.data.synthetic.saccades import SaccadeSpec, saccade_path, simulate_saccades


def _digit() -> np.ndarray:
    img = np.zeros((1, 28, 28), dtype=np.uint8)
    img[0, 6:22, 10:18] = 255
    return img


def test_saccade_path_rests_between_saccades_and_reaches_every_vertex():
    spec = SaccadeSpec(onsets_us=(10_000, 110_000, 220_000), move_us=70_000, duration_us=300_000)
    times, pos = saccade_path(spec)
    verts = np.asarray(spec.vertices)
    n = len(verts)
    for k, onset in enumerate(spec.onsets_us):
        resting = (times <= onset) & (times >= (spec.onsets_us[k - 1] + spec.move_us if k else 0))
        np.testing.assert_allclose(pos[resting], np.broadcast_to(verts[k], pos[resting].shape), atol=1e-12)
        arrived = times == onset + spec.move_us
        np.testing.assert_allclose(pos[arrived][0], verts[(k + 1) % n], atol=1e-12)
        moving = (times > onset) & (times < onset + spec.move_us)
        assert np.all(np.abs(np.diff(pos[moving], axis=0)).sum(1) > 0)  # it moves throughout the saccade
    np.testing.assert_allclose(pos[-1], pos[0])  # a closed triangle


@pytest.mark.parametrize("bad", [
    {"onsets_us": (0, 50_000, 200_000)},  # the first saccade overlaps the second
    {"onsets_us": (0, 100_000)},  # a vertex without its saccade
    {"duration_us": 250_000},  # the last saccade ends after the recording
])
def test_saccade_spec_refuses_saccades_that_cannot_be_made(bad):
    with pytest.raises(ValueError, match="SaccadeSpec"):
        SaccadeSpec(**{"onsets_us": (0, 100_000, 200_000), "move_us": 80_000, "duration_us": 300_000, **bad})


def test_a_closed_path_ends_without_a_burst():
    """The last saccade returns the digit exactly to where it started; with every reference
    starting at the first frame, pixels that had crossed a threshold once each way sat exactly on
    a threshold there, and rounding fired 80-170 events in that one frame."""
    yy, xx = np.mgrid[:28, :28]
    ring = (255 * np.clip(2.5 - np.abs(np.hypot(yy - 13.6, xx - 13.3) - 8), 0, 1))[None].astype(np.uint8)
    spec = SaccadeSpec()
    back = spec.onsets_us[-1] + spec.move_us
    for seed in range(3):
        ev = simulate_saccades(ring, spec, np.random.default_rng(seed))[0]
        assert ((ev["t"] > back - spec.frame_us) & (ev["t"] <= back)).sum() <= 5


def test_static_video_fires_nothing_whatever_the_starting_reference():
    frames = np.random.default_rng(0).normal(0, 1, (2, 1, 8, 8)).astype(np.float32).repeat(50, axis=1)
    times = np.arange(50) * 1000.0
    for spread in (0.0, 1.0):
        events = video_to_events(frames, times, PixelModel(threshold=0.3, reference_spread=spread),
                                 np.random.default_rng(1))
        assert all(len(e) == 0 for e in events)


def test_starting_references_spread_the_first_events_of_a_ramp():
    """On a log-intensity ramp of slope s, a pixel whose reference starts at the first frame fires
    first at thr / s; one whose reference lies anywhere within a threshold, uniformly in (0, 2 thr / s)."""
    ramp = np.linspace(0, 3, 301, dtype=np.float32)  # 0.01 per 1 ms frame
    frames = np.broadcast_to(ramp[None, :, None, None], (1, 301, 16, 16)).copy()
    times = np.arange(301) * 1000.0
    model = PixelModel(threshold=0.3, threshold_mismatch=0.0)

    def first_times(spread: float) -> np.ndarray:
        ev = video_to_events(frames, times, dataclasses.replace(model, reference_spread=spread),
                             np.random.default_rng(0))[0]
        pix = ev["y"].astype(int) * 16 + ev["x"]
        first = np.full(256, np.inf)
        np.minimum.at(first, pix, ev["t"])
        return first

    np.testing.assert_allclose(first_times(0.0), 30_000, atol=1)
    spread = first_times(1.0)
    assert spread.min() < 6_000 and spread.max() > 54_000 and abs(spread.mean() - 30_000) < 3_000


def test_reference_spread_zero_draws_nothing_from_the_generator():
    """Recordings made without it (the embedded dataset) stay exactly what they were."""
    frames = np.random.default_rng(0).normal(0, 1, (1, 5, 4, 4)).astype(np.float32)
    rng = np.random.default_rng(3)
    video_to_events(frames, np.arange(5) * 1000.0, PixelModel(reference_spread=0.0), rng)
    fresh = np.random.default_rng(3)
    fresh.standard_normal((1, 4, 4))  # the threshold mismatch only
    assert rng.random() == fresh.random()


def test_contrast_jitter_spreads_the_event_counts_of_one_digit():
    def counts(jitter: float) -> np.ndarray:
        spec = SaccadeSpec(contrast_jitter=jitter, jitter_px=0.0)
        return np.array([len(simulate_saccades(_digit(), spec, np.random.default_rng(s))[0]) for s in range(12)])

    steady, jittered = counts(0.0), counts(0.18)
    assert jittered.std() > 3 * steady.std()
