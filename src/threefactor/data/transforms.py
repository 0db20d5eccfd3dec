"""Transforms: small frozen dataclasses over plain numpy functions, composable like Tonic's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np


def to_frame(
    events: np.ndarray, sensor_size: tuple[int, int, int], dt_us: int, n_bins: int | None = None
) -> np.ndarray:
    """Count events into frames of shape (T, P, H, W) with bins of ``dt_us`` microseconds.

    Bin k holds events with ``k * dt_us <= t < (k + 1) * dt_us``, counting from t = 0, so a
    recording's frames line up with its clock. With ``n_bins`` the output has exactly that many
    bins (later events are dropped, missing bins are zero).
    """
    width, height, n_pol = sensor_size
    if dt_us <= 0:
        raise ValueError(f"dt_us must be > 0, got {dt_us}")
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
