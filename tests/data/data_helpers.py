"""Helpers of the data-layer tests: hypothesis strategies for event arrays, the event checker,
where the real data is. (Not in conftest.py: a plain module cannot be confused with tests/conftest.py.)"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from threefactor.data.events import make_events


@st.composite
def events(draw, max_n: int = 60, max_xy: int = 127, max_dt: int = 5000, sorted_t: bool = True,
           exclude_y: int | None = None):
    n = draw(st.integers(0, max_n))
    xs = draw(st.lists(st.integers(0, max_xy), min_size=n, max_size=n))
    ys = draw(st.lists(st.integers(0, max_xy).filter(lambda v: v != exclude_y), min_size=n, max_size=n))
    ps = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    t0 = draw(st.integers(0, 10 * max_dt))
    dts = draw(st.lists(st.integers(0, max_dt), min_size=n, max_size=n))
    t = t0 + np.cumsum(np.asarray(dts, dtype=np.int64)) if sorted_t else np.asarray(dts, dtype=np.int64)
    return make_events(np.asarray(xs, dtype=np.int64), np.asarray(ys, dtype=np.int64), t,
                       np.asarray(ps, dtype=np.int64))


# --------------------------------------------------------------------------- shared helpers

from pathlib import Path  # noqa: E402

from threefactor.data.events import EVENT_DTYPE  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def assert_valid_events(ev: np.ndarray) -> None:
    """What every reader promises: EVENT_DTYPE, x, y, t >= 0 and p in {0, 1}."""
    assert isinstance(ev, np.ndarray) and ev.dtype == EVENT_DTYPE and ev.ndim == 1
    if len(ev):
        assert ev["x"].min() >= 0 and ev["y"].min() >= 0 and ev["t"].min() >= 0
        assert np.isin(ev["p"], (0, 1)).all()
