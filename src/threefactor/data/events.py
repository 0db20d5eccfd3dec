"""Events as numpy structured arrays with fields x, y, t (microseconds), p, as in Tonic."""

from __future__ import annotations

import numpy as np

EVENT_DTYPE = np.dtype([("x", "<i2"), ("y", "<i2"), ("t", "<i8"), ("p", "<i1")])
MAX_COORD = int(np.iinfo(EVENT_DTYPE["x"]).max)  # the largest x or y an event can hold


def make_events(x, y, t, p) -> np.ndarray:
    """Pack equal-length coordinate, time (us) and polarity arrays into ``EVENT_DTYPE``."""
    x, y, t, p = (np.asarray(a) for a in (x, y, t, p))
    n = len(t)
    if not (len(x) == len(y) == len(p) == n):
        raise ValueError(f"event fields differ in length: x {len(x)}, y {len(y)}, t {n}, p {len(p)}")
    events = np.empty(n, dtype=EVENT_DTYPE)
    events["x"], events["y"], events["t"], events["p"] = x, y, t, p
    return events


# --------------------------------------------------------------------------- the sensor's bounds
# A sensor (W, H, P) holds x in [0, W), y in [0, H) and p in [0, P); a sensor of one polarity
# channel counts both polarities (0 and 1) in it.


def polarity_limit(n_polarities: int) -> int:
    """The polarities a sensor of ``n_polarities`` channels accepts are 0 .. limit - 1."""
    return 2 if n_polarities == 1 else n_polarities


_UNSIGNED = {np.dtype(f"{order}i{n}"): np.dtype(f"{order}u{n}") for order in "<>" for n in (1, 2, 4, 8)}


def _all_below(values: np.ndarray, limit: int) -> bool:
    """Whether every value is in [0, limit); ``values`` is not empty."""
    unsigned = _UNSIGNED.get(values.dtype)
    if unsigned is not None:
        # Seen as unsigned, a negative value is larger than any limit: one pass, not two.
        return int(values.view(unsigned).max()) < limit
    if values.dtype.kind in "ub":
        return int(values.max()) < limit
    return bool(np.all((values >= 0) & (values < limit)))  # floats: NaN fails both tests


def inside_sensor(events: np.ndarray, sensor_size: tuple[int, int, int]) -> np.ndarray:
    """Boolean mask of the events whose x, y and p lie on the (W, H, P) sensor."""
    width, height, n_pol = sensor_size
    x, y, p = events["x"], events["y"], events["p"]
    return (x >= 0) & (x < width) & (y >= 0) & (y < height) & (p >= 0) & (p < polarity_limit(n_pol))


def first_outside_sensor(events: np.ndarray, sensor_size: tuple[int, int, int]) -> int | None:
    """Index of the first event whose x, y or p lies off the (W, H, P) sensor; None if none does.

    The common case, every event inside, costs one pass over each field.
    """
    if len(events) == 0:
        return None
    width, height, n_pol = sensor_size
    if (_all_below(events["x"], width) and _all_below(events["y"], height)
            and _all_below(events["p"], polarity_limit(n_pol))):
        return None
    return int(np.flatnonzero(~inside_sensor(events, sensor_size))[0])


def describe_event(events: np.ndarray, index: int) -> str:
    """'event 17 (x 40, y 3, p 1, t 5012 us)': one event, for an error message."""
    e = events[index]
    return f"event {index} (x {int(e['x'])}, y {int(e['y'])}, p {int(e['p'])}, t {int(e['t'])} us)"


def describe_sensor(sensor_size: tuple[int, ...]) -> str:
    """'34 x 34 sensor with 2 polarities': a (W, H, P) sensor, for an error message."""
    width, height, n_pol = sensor_size
    return f"{width} x {height} sensor with {n_pol} polarit{'y' if n_pol == 1 else 'ies'}"
