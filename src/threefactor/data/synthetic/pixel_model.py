"""An event-camera pixel model: a pixel fires when its log intensity has moved by a threshold.

Each pixel remembers the log intensity at its last event (its reference). Whenever the
current log intensity is ``k`` thresholds above (below) the reference, it emits ``k`` ON
(OFF) events and moves the reference by ``k`` thresholds. Event times are interpolated
linearly between frames, so a finely sampled video gives sub-frame timestamps, as a real
DVS would. Thresholds vary from pixel to pixel (fixed-pattern mismatch) and background
activity adds Poisson noise events. A real pixel's last event happened before the recording
began, so its reference can sit anywhere within a threshold of the first frame
(``reference_spread``); starting every reference exactly at the first frame instead delays the
first events of a slow start and makes a video that returns exactly to its first frame (a
closed path) leave its pixels exactly on a threshold, where rounding fires a burst.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..events import make_events


@dataclass(frozen=True)
class PixelModel:
    threshold: float = 0.2  # contrast threshold, in log-intensity units
    threshold_mismatch: float = 0.02  # std of the per-pixel threshold
    noise_rate_hz: float = 0.0  # background events per pixel per second (both polarities)
    reference_spread: float = 0.0  # initial reference: first frame + U(-1, 1) x this x the pixel's threshold


def video_to_events(
    log_frames: np.ndarray,
    times_us: np.ndarray,
    model: PixelModel = PixelModel(),
    rng: np.random.Generator | None = None,
) -> list[np.ndarray]:
    """Events of a batch of log-intensity videos.

    ``log_frames`` has shape (N, F, H, W): N videos of F frames taken at ``times_us`` (F,).
    The first frame sets the references and emits nothing. Returns N event arrays sorted by
    time, with ON as p = 1 and OFF as p = 0.
    """
    rng = rng if rng is not None else np.random.default_rng()
    log_frames = np.asarray(log_frames, dtype=np.float32)
    if log_frames.ndim != 4:
        raise ValueError(f"log_frames must have shape (N, F, H, W), got {log_frames.shape}")
    n, f, h, w = log_frames.shape
    times_us = np.asarray(times_us, dtype=np.float64)
    if times_us.shape != (f,) or np.any(np.diff(times_us) < 0):
        raise ValueError(f"times_us must be {f} non-decreasing times, got shape {times_us.shape}")

    thr = model.threshold + model.threshold_mismatch * rng.standard_normal((n, h, w))
    thr = np.maximum(thr, 0.2 * model.threshold).astype(np.float32)  # a pixel never gets a (near-)zero threshold
    ref = log_frames[:, 0].copy()
    if model.reference_spread > 0:  # no draw otherwise: recordings made without it stay the same
        ref += (rng.uniform(-1.0, 1.0, ref.shape) * model.reference_spread * thr).astype(np.float32)
    chunks: list[tuple[np.ndarray, ...]] = []
    for i in range(1, f):
        prev, cur = log_frames[:, i - 1], log_frames[:, i]
        delta = cur - ref
        k = np.floor(np.abs(delta) / thr).astype(np.int64)
        idx = np.flatnonzero(k)
        if idx.size == 0:
            continue
        counts = k.ravel()[idx]
        sign = np.sign(delta.ravel()[idx])
        rep = np.repeat(idx, counts)
        # 1..k within each pixel's run of events
        level = np.arange(rep.size) - np.repeat(np.cumsum(counts) - counts, counts) + 1
        crossing = ref.ravel()[rep] + np.repeat(sign, counts) * level * thr.ravel()[rep]
        step = cur.ravel()[rep] - prev.ravel()[rep]
        with np.errstate(divide="ignore", invalid="ignore"):
            frac = np.where(step != 0, (crossing - prev.ravel()[rep]) / step, 1.0)
        t = times_us[i - 1] + np.clip(frac, 0.0, 1.0) * (times_us[i] - times_us[i - 1])
        sample, rest = np.divmod(rep, h * w)
        y, x = np.divmod(rest, w)
        chunks.append((sample, x, y, t, np.repeat(sign > 0, counts)))
        ref.ravel()[idx] += sign * counts * thr.ravel()[idx]

    if model.noise_rate_hz > 0:
        duration_s = (times_us[-1] - times_us[0]) * 1e-6
        n_noise = rng.poisson(model.noise_rate_hz * duration_s * h * w * n)
        chunks.append((
            rng.integers(0, n, n_noise), rng.integers(0, w, n_noise), rng.integers(0, h, n_noise),
            rng.uniform(times_us[0], times_us[-1], n_noise), rng.integers(0, 2, n_noise).astype(bool),
        ))

    if not chunks:
        return [make_events([], [], [], []) for _ in range(n)]
    sample, x, y, t, p = (np.concatenate(c) for c in zip(*chunks))
    t = np.floor(t).astype(np.int64)
    order = np.lexsort((t, sample))
    sample, x, y, t, p = sample[order], x[order], y[order], t[order], p[order]
    bounds = np.searchsorted(sample, np.arange(n + 1))
    return [
        make_events(x[a:b], y[a:b], t[a:b], p[a:b]) for a, b in zip(bounds[:-1], bounds[1:])
    ]
