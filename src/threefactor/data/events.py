"""Events as numpy structured arrays with fields x, y, t (microseconds), p, as in Tonic."""

from __future__ import annotations

import numpy as np

EVENT_DTYPE = np.dtype([("x", "<i2"), ("y", "<i2"), ("t", "<i8"), ("p", "<i1")])


def make_events(x, y, t, p) -> np.ndarray:
    """Pack equal-length coordinate, time (us) and polarity arrays into ``EVENT_DTYPE``."""
    x, y, t, p = (np.asarray(a) for a in (x, y, t, p))
    n = len(t)
    if not (len(x) == len(y) == len(p) == n):
        raise ValueError(f"event fields differ in length: x {len(x)}, y {len(y)}, t {n}, p {len(p)}")
    events = np.empty(n, dtype=EVENT_DTYPE)
    events["x"], events["y"], events["t"], events["p"] = x, y, t, p
    return events
