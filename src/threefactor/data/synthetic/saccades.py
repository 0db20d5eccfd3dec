"""N-MNIST-like recordings made here: a static image moved in three saccades in front of the pixel model.

N-MNIST was recorded by an ATIS sensor on a pan-tilt unit making three ~100 ms saccades that
form a triangle, in front of a monitor showing an MNIST digit (Orchard et al. 2015); the
34 x 34 view is the 28 x 28 digit plus the ~6 pixels it travels. We do the same in software:
the digit (blurred a little, as optics do) is drawn at sub-pixel positions along that
triangle (bilinear sampling, done as two small matrix products since the motion is a pure
translation), turned into log intensity above a monitor's black level, and handed to
``pixel_model.video_to_events`` -- the same pixel model as the embedded dataset.

The triangle and its timing below were read off the real recordings in ``shared/data/nmnist-small``:
the event centroid moves down (and a little right) in the first saccade, up-right in the second
and left in the third, with the event rate peaking mid-saccade (a smooth start and stop); each
saccade moves for about 80 ms and the sensor rests in between (docs/sim2real.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .pixel_model import PixelModel, video_to_events


@dataclass(frozen=True)
class SaccadeSpec:
    """How a simulated N-MNIST recording is made; positions are the digit's top-left corner (x, y)
    on the sensor, in pixels, at the ends of the saccades (the first vertex is also the start).

    Saccade ``k`` starts at ``onsets_us[k]``, moves for ``move_us`` and then rests until the next
    one; the recording lasts ``duration_us``. The defaults are calibrated against the real
    recordings (docs/sim2real.md, ``python -m benchmarks.calibrate_nmnist``).
    """

    sensor: int = 34
    vertices: tuple[tuple[float, float], ...] = ((0.5, 1.5), (2.5, 6.0), (5.5, 1.5))
    onsets_us: tuple[float, ...] = (8_000.0, 108_000.0, 220_000.0)
    move_us: float = 78_000.0
    duration_us: float = 306_000.0
    frame_us: float = 1_000.0  # video sampling; the pixel model interpolates event times within it
    blur_px: float = 0.5  # Gaussian blur of the optics, in sensor pixels
    black_level: float = 0.1  # the monitor's black, relative to its white
    jitter_px: float = 0.25  # per-recording random shift of the whole path (mounting, timing)
    contrast_jitter: float = 0.18  # per-recording log-normal spread of the contrast (monitor, sensor bias)
    pixel: PixelModel = PixelModel(threshold=0.34, threshold_mismatch=0.03, noise_rate_hz=0.2,
                                   reference_spread=1.0)

    def __post_init__(self) -> None:
        if len(self.onsets_us) != len(self.vertices):
            raise ValueError(f"SaccadeSpec has {len(self.vertices)} vertices but {len(self.onsets_us)} onsets_us: "
                             "one saccade leaves each vertex")
        ends = [t + self.move_us for t in self.onsets_us]
        if self.move_us <= 0 or self.onsets_us[0] < 0 or any(
                end > nxt for end, nxt in zip(ends, [*self.onsets_us[1:], self.duration_us])):
            raise ValueError(f"SaccadeSpec's saccades (onsets_us {self.onsets_us}, move_us {self.move_us}) must "
                             f"follow one another without overlapping, within duration_us {self.duration_us}")


def saccade_path(spec: SaccadeSpec = SaccadeSpec()) -> tuple[np.ndarray, np.ndarray]:
    """Frame times (F,) in us and the digit's top-left position (F, 2) along the closed triangle.

    Within a saccade the position follows (1 - cos(pi u)) / 2 of the way, u in [0, 1], so the
    speed is zero at the corners and highest mid-saccade, like the pan-tilt unit's moves;
    between saccades (and before the first) it rests on a vertex.
    """
    n_frames = int(round(spec.duration_us / spec.frame_us)) + 1
    times = np.arange(n_frames) * spec.frame_us
    verts = np.asarray(spec.vertices, dtype=np.float64)
    onsets = np.asarray(spec.onsets_us, dtype=np.float64)
    k = np.maximum(np.searchsorted(onsets, times, side="right") - 1, 0)  # the saccade under way or last made
    u = np.clip((times - onsets[k]) / spec.move_us, 0, 1)
    s = (1 - np.cos(np.pi * u)) / 2
    start, end = verts[k], verts[(k + 1) % len(verts)]
    return times, start + (end - start) * s[:, None]


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return images
    radius = max(1, int(np.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-x**2 / (2 * sigma**2))
    k = k / k.sum()
    images = F.conv2d(images, k.view(1, 1, 1, -1), padding=(0, radius))
    return F.conv2d(images, k.view(1, 1, -1, 1), padding=(radius, 0))


def simulate_saccades(
    images: np.ndarray,
    spec: SaccadeSpec = SaccadeSpec(),
    rng: np.random.Generator | None = None,
) -> list[np.ndarray]:
    """Event recordings (``EVENT_DTYPE``, N-MNIST-like) of images (N, H, W), uint8 0..255 or
    floats 0..1, each moved along the saccade triangle in front of ``spec.pixel``."""
    rng = rng if rng is not None else np.random.default_rng()
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"images must have shape (N, H, W), got {images.shape}")
    scale = 255.0 if images.dtype == np.uint8 else 1.0
    n, h, w = images.shape
    pad = 4  # room for the blur to spread beyond the image border
    img = torch.from_numpy(images.astype(np.float32) / scale)[:, None]
    img = _gaussian_blur(F.pad(img, (pad, pad, pad, pad)), spec.blur_px)

    times, pos = saccade_path(spec)
    jitter = rng.normal(0.0, spec.jitter_px, size=(n, 1, 2)) if spec.jitter_px > 0 else np.zeros((n, 1, 2))
    pos = torch.from_numpy((pos[None] + jitter).astype(np.float32))  # (n, F, 2)
    coords = torch.arange(spec.sensor, dtype=torch.float32)
    # The motion is a pure translation, so bilinear sampling is separable: sensor pixel (u, v)
    # sees image pixel (u - x0, v - y0) (+ padding), and the video is Wy @ image @ Wx^T with
    # "hat" interpolation weights max(0, 1 - |distance|) -- zero outside the image.
    src_x = coords[None, None, :, None] - pos[:, :, None, None, 0] + pad  # (n, F, S, 1)
    src_y = coords[None, None, :, None] - pos[:, :, None, None, 1] + pad
    wx = (1 - (src_x - torch.arange(w + 2 * pad, dtype=torch.float32)).abs()).clamp_(min=0)  # (n, F, S, W')
    wy = (1 - (src_y - torch.arange(h + 2 * pad, dtype=torch.float32)).abs()).clamp_(min=0)  # (n, F, S, H')
    video = wy @ img @ wx.transpose(-1, -2)  # (n, F, S, S)
    video = video.clamp_(0, 1)
    log_video = torch.log(spec.black_level + (1 - spec.black_level) * video).numpy()
    if spec.contrast_jitter > 0:
        log_video *= np.exp(rng.normal(0.0, spec.contrast_jitter, size=(n, 1, 1, 1))).astype(np.float32)
    events = video_to_events(log_video, times, spec.pixel, rng)
    last = int(spec.duration_us) - 1
    for ev in events:
        # A crossing exactly at the last frame would open a bin of its own; keep it in the last one.
        np.minimum(ev["t"], last, out=ev["t"])
    return events
