"""Transforms: small frozen dataclasses over plain numpy functions, composable like Tonic's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .events import describe_event, describe_sensor, first_outside_sensor


def to_frame(
    events: np.ndarray, sensor_size: tuple[int, int, int], dt_us: int, n_bins: int | None = None
) -> np.ndarray:
    """Count events into frames of shape (T, P, H, W) with bins of ``dt_us`` microseconds.

    Bin k holds events with ``k * dt_us <= t < (k + 1) * dt_us``, counting from t = 0, so a
    recording's frames line up with its clock. With ``n_bins`` the output has exactly that many
    bins (later events are dropped, missing bins are zero). An event off the (W, H, P) sensor
    is a ``ValueError`` naming it: counted, it would land in another pixel or time bin.
    A sensor of one polarity channel counts both polarities in it.
    """
    width, height, n_pol = sensor_size
    if dt_us <= 0:
        raise ValueError(f"dt_us must be > 0, got {dt_us}")
    bad = first_outside_sensor(events, sensor_size)
    if bad is not None:
        raise ValueError(f"{describe_event(events, bad)} lies outside the {describe_sensor(sensor_size)}")
    t = events["t"].astype(np.int64)
    if n_bins is None:
        n_bins = int(t.max() // dt_us) + 1 if len(t) else 0
    b = t // dt_us
    keep = (b >= 0) & (b < n_bins)
    p = events["p"][keep].astype(np.int64)
    if n_pol == 1:
        p = np.zeros_like(p)
    flat = ((b[keep] * n_pol + p) * height + events["y"][keep]) * width + events["x"][keep]
    counts = np.bincount(flat, minlength=n_bins * n_pol * height * width)
    return counts.reshape(n_bins, n_pol, height, width).astype(np.float32)


@dataclass(frozen=True)
class ToFrame:
    """Events -> float32 count frames (T, P, H, W); ``sensor_size`` is (W, H, P) as in Tonic."""

    sensor_size: tuple[int, int, int]
    dt_us: int = 1000
    n_bins: int | None = None

    def __call__(self, events: np.ndarray) -> np.ndarray:
        return to_frame(events, self.sensor_size, self.dt_us, self.n_bins)


@dataclass(frozen=True)
class Compose:
    transforms: Sequence[Callable]

    def __call__(self, x):
        for transform in self.transforms:
            x = transform(x)
        return x


# --------------------------------------------------------------------------- event transforms
# Each is a plain function over an EVENT_DTYPE array plus a frozen dataclass that holds its
# parameters, so a transform's repr names everything that decides its output (the cache keys
# on it). None of them modifies its input.


def downsample(events: np.ndarray, factor: int) -> np.ndarray:
    """Coordinates divided by ``factor`` (floor): binned, each output pixel counts the events of
    a ``factor x factor`` block, i.e. the frames are summed, not averaged (DVS Gesture 128 -> 32)."""
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    out = events.copy()
    out["x"] //= factor
    out["y"] //= factor
    return out


@dataclass(frozen=True)
class Downsample:
    """Spatial downsampling by summing ``factor x factor`` blocks; sensor (W, H) -> (W//f, H//f)."""

    factor: int

    def __call__(self, events: np.ndarray) -> np.ndarray:
        return downsample(events, self.factor)


def crop(events: np.ndarray, x0: int, y0: int, width: int, height: int) -> np.ndarray:
    """Events inside the box [x0, x0 + width) x [y0, y0 + height), moved so the box starts at 0."""
    keep = (events["x"] >= x0) & (events["x"] < x0 + width) & (events["y"] >= y0) & (events["y"] < y0 + height)
    out = events[keep]  # boolean indexing copies
    out["x"] -= x0
    out["y"] -= y0
    return out


@dataclass(frozen=True)
class Crop:
    """Keep a ``width x height`` box whose top-left corner is (x0, y0)."""

    x0: int
    y0: int
    width: int
    height: int

    def __call__(self, events: np.ndarray) -> np.ndarray:
        return crop(events, self.x0, self.y0, self.width, self.height)


@dataclass(frozen=True)
class CenterCrop:
    """Keep the centred ``size`` (W, H) box of a ``sensor_size`` (W, H[, P]) sensor (N-MNIST 34 -> 32)."""

    sensor_size: tuple[int, ...]
    size: tuple[int, int]

    def __call__(self, events: np.ndarray) -> np.ndarray:
        (w, h), (cw, ch) = self.sensor_size[:2], self.size
        if cw > w or ch > h:
            raise ValueError(f"crop size {self.size} is larger than the sensor {self.sensor_size[:2]}")
        return crop(events, (w - cw) // 2, (h - ch) // 2, cw, ch)


def time_window(events: np.ndarray, start_us: int, duration_us: int) -> np.ndarray:
    """Events with ``start_us <= t < start_us + duration_us``, times shifted to start at 0."""
    t = events["t"]
    out = events[(t >= start_us) & (t < start_us + duration_us)]
    out["t"] -= start_us
    return out


@dataclass(frozen=True)
class TimeWindow:
    """A fixed window, e.g. the first 1800 ms for testing on DVS Gesture: ``TimeWindow(1_800_000)``."""

    duration_us: int
    start_us: int = 0

    def __call__(self, events: np.ndarray) -> np.ndarray:
        return time_window(events, self.start_us, self.duration_us)


def random_time_slice(events: np.ndarray, duration_us: int, rng: np.random.Generator) -> np.ndarray:
    """A window of ``duration_us`` at a uniformly random start that keeps it inside the recording.

    Starts run from the first event's time to ``last - duration + 1``, so the window never
    reaches past the last event; a recording shorter than the window is returned whole
    (shifted to start at 0), never padded with an empty stretch at a random place.
    """
    if duration_us <= 0:
        raise ValueError(f"duration_us must be > 0, got {duration_us}")
    if len(events) == 0:
        return events.copy()
    first, last = int(events["t"].min()), int(events["t"].max())
    latest = max(first, last - duration_us + 1)
    start = int(rng.integers(first, latest + 1))
    return time_window(events, start, duration_us)


@dataclass(frozen=True)
class RandomTimeSlice:
    """Random window of ``duration_us`` (DVS Gesture training: 500 ms). ``seed`` is an int,
    a ``numpy.random.Generator`` (used as is) or None (fresh entropy).

    Random, so never cached: give it to ``CachedDataset`` as ``post_transform``. DataLoader
    workers start with copies of one generator; reseed per worker (``reseed``) to decorrelate.
    """

    duration_us: int
    seed: int | None = None
    random = True  # class attribute: tells the cache this transform must not be cached
    _rng: np.random.Generator = field(init=False, repr=False, compare=False, default=None)

    def __init__(self, duration_us: int, seed: int | np.random.Generator | None = None) -> None:
        gen = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        object.__setattr__(self, "duration_us", duration_us)
        object.__setattr__(self, "seed", None if isinstance(seed, np.random.Generator) else seed)
        object.__setattr__(self, "_rng", gen)

    def reseed(self, seed: int) -> None:
        object.__setattr__(self, "_rng", np.random.default_rng(seed))

    def __call__(self, events: np.ndarray) -> np.ndarray:
        return random_time_slice(events, self.duration_us, self._rng)


def merge_polarities(events: np.ndarray) -> np.ndarray:
    """All polarities set to 0, for a (W, H, 1) sensor."""
    out = events.copy()
    out["p"] = 0
    return out


@dataclass(frozen=True)
class MergePolarities:
    def __call__(self, events: np.ndarray) -> np.ndarray:
        return merge_polarities(events)


def denoise(events: np.ndarray, filter_time_us: int) -> np.ndarray:
    """Drop events with no event at a 4-neighbour pixel within ``filter_time_us`` before them.

    Tonic's Denoise, vectorised: walking the events in array order, an event is kept when one
    of its four neighbours (x +- 1 or y +- 1) had an earlier event (earlier in the array) with
    ``t_event - t_neighbour < filter_time_us``. Unlike Tonic, no pixel is taken to have fired
    at t = 0, so the first ``filter_time_us`` of a recording is filtered like the rest.
    Expects events sorted by time, as recordings are.
    """
    n = len(events)
    if n == 0:
        return events.copy()
    x = events["x"].astype(np.int64)
    y = events["y"].astype(np.int64)
    t = events["t"].astype(np.int64)
    # Pixel ids on a grid with a one-pixel border, so neighbours of edge pixels exist (and are empty).
    width = int(x.max()) + 3
    pix = (y + 1) * width + (x + 1)
    idx = np.arange(n, dtype=np.int64)
    # Sorting by (pixel, index) lets one searchsorted find, for any (pixel, index), the latest
    # earlier event at that pixel.
    key = pix * n + idx
    order = np.argsort(key, kind="stable")
    key_sorted = key[order]
    keep = np.zeros(n, dtype=bool)
    for offset in (-1, 1, -width, width):
        q = pix + offset
        pos = np.searchsorted(key_sorted, q * n + idx) - 1
        pos_c = np.clip(pos, 0, n - 1)
        found = (pos >= 0) & (key_sorted[pos_c] // n == q)
        t_nb = t[order[pos_c]]
        keep |= found & (t - t_nb < filter_time_us)
    return events[keep]


@dataclass(frozen=True)
class Denoise:
    filter_time_us: int = 10_000

    def __call__(self, events: np.ndarray) -> np.ndarray:
        return denoise(events, self.filter_time_us)


def sum_pool(frames: np.ndarray, factor: int) -> np.ndarray:
    """Frames (..., H, W) summed over ``factor x factor`` blocks (H, W divisible by ``factor``)."""
    *lead, h, w = frames.shape
    if h % factor or w % factor:
        raise ValueError(f"frame size {h}x{w} is not divisible by {factor}")
    return frames.reshape(*lead, h // factor, factor, w // factor, factor).sum(axis=(-3, -1))
