"""The recordings of the embedded dataset: textures in motion in front of the pixel model,
made in-process in seconds.

Eight classes come in four time-reversed pairs: translation right/left and up/down, rotation
counter-clockwise/clockwise, expansion/contraction. Every sample shows a fresh random texture
of bright and dark dots, symmetric in sign. Playing a
recording backwards turns each class into its partner and swaps ON and OFF events; since the
texture distribution is unchanged by contrast inversion, the *time-summed* event-count images
of the two classes of a pair have the same distribution. A classifier that sees only those
images can at best tell the pairs apart (50 %): what is left must come from the order of
events in time, which is what a spiking network with leaky traces can pick up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .pixel_model import PixelModel, video_to_events

MOTION_CLASSES: tuple[str, ...] = (
    "right", "left", "up", "down", "rotate_ccw", "rotate_cw", "expand", "contract",
)
SENSOR_SIZE = (32, 32, 2)  # (W, H, P), as in Tonic
_CANVAS = 128  # texture side, in pixels; the 32 x 32 view never leaves it
_SUBSTEPS = 4  # video frames per 1 ms time step, for sub-step event timing


@dataclass(frozen=True)
class MotionSpec:
    """How the recordings are made. ``speed`` is in pixels per ms (at radius 10 for rotation)."""

    timesteps: int = 60
    speed: float = 0.6
    contrast: float = 1.0  # peak log-intensity change of a dot (bright +, dark -)
    dots_per_view: float = 8.0  # mean number of dots in the 32 x 32 view
    dot_sigma_px: float = 1.2
    pixel: PixelModel = PixelModel(threshold=0.2, noise_rate_hz=2.0)


def _textures(n: int, gen: torch.Generator, spec: MotionSpec) -> torch.Tensor:
    """n random dot textures (n, 1, C, C) in log intensity: bright and dark Gaussian dots.

    Sparse dots (rather than dense noise) leave clean trace "comets" behind them whose tails
    point against the motion; dense textures blur them into each other.
    """
    density = spec.dots_per_view / (32 * 32)
    impulses = (torch.rand(n, _CANVAS, _CANVAS, generator=gen) < density).float()
    signs = torch.randint(0, 2, (n, _CANVAS, _CANVAS), generator=gen).float() * 2 - 1
    freqs = torch.fft.fftfreq(_CANVAS)
    f2 = freqs[:, None] ** 2 + freqs[None, :] ** 2
    sigma = spec.dot_sigma_px
    kernel = torch.exp(-2 * (math.pi * sigma) ** 2 * f2) * (2 * math.pi * sigma**2)  # peak 1
    tex = torch.fft.ifft2(torch.fft.fft2(impulses * signs) * kernel).real
    return (tex * spec.contrast)[:, None]


def _sampling_grid(labels: torch.Tensor, gen: torch.Generator, spec: MotionSpec) -> torch.Tensor:
    """Texture coordinates (n, F, 32, 32, 2) seen by each view pixel at each video frame.

    Every motion is an affine map of view coordinates, tex = A(tau) (v - c) + c + b(tau) + o,
    with tau centred on the middle of the recording so that each class's time reversal is
    exactly its partner class.
    """
    n = len(labels)
    frames = spec.timesteps * _SUBSTEPS + 1
    tau = (torch.arange(frames) / _SUBSTEPS - spec.timesteps / 2)[None, :]  # (1, F) ms
    speed = spec.speed * (0.8 + 0.4 * torch.rand(n, 1, generator=gen))
    centre = torch.rand(n, 2, generator=gen) * 8 - 4
    offset = (torch.rand(n, 2, generator=gen) * 2 - 1) * (_CANVAS / 2 - 32) * 0.3
    lab = labels[:, None]

    # Translation: the pattern moves by +speed*tau*d, so a view pixel sees the texture at v - shift.
    # "up" moves towards y = 0.
    direction = torch.tensor([[1.0, 0], [-1, 0], [0, -1], [0, 1], [0, 0], [0, 0], [0, 0], [0, 0]])
    shift = -(speed * tau)[..., None] * direction[labels][:, None, :]  # (n, F, 2)
    # Rotation: angular speed giving `speed` px/ms at radius 10; the view turns against it.
    sense = torch.where(lab == 4, 1.0, torch.where(lab == 5, -1.0, 0.0))
    angle = -sense * speed / 10.0 * tau
    # Expansion: scale exp(-+lambda tau), lambda giving speed/2 px/ms at radius 10.
    grow = torch.where(lab == 6, 1.0, torch.where(lab == 7, -1.0, 0.0))
    scale = torch.exp(-grow * speed / 20.0 * tau)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    a = torch.stack((torch.stack((cos, -sin), -1), torch.stack((sin, cos), -1)), -2)  # (n, F, 2, 2)

    coords = torch.arange(32) - 15.5
    vy, vx = torch.meshgrid(coords, coords, indexing="ij")
    vx = vx.reshape(1, 1, 1024) - centre[:, 0, None, None]
    vy = vy.reshape(1, 1, 1024) - centre[:, 1, None, None]
    b = (centre + offset)[:, None, :] + shift  # (n, F, 2)
    grid = torch.stack((
        a[..., 0, 0, None] * vx + a[..., 0, 1, None] * vy + b[..., 0, None],
        a[..., 1, 0, None] * vx + a[..., 1, 1, None] * vy + b[..., 1, None],
    ), -1)
    # grid_sample's normalised coordinates (align_corners=False): the canvas centre is 0.
    return (grid / (_CANVAS / 2)).reshape(n, frames, 32, 32, 2)


def make_motion_dataset(
    n: int, seed: int, spec: MotionSpec = MotionSpec(), chunk: int = 16
) -> tuple[list[np.ndarray], np.ndarray]:
    """``n`` event recordings (classes balanced, order shuffled) and their labels, by seed."""
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    labels = torch.arange(n) % len(MOTION_CLASSES)
    labels = labels[torch.randperm(n, generator=gen)]
    events: list[np.ndarray] = []
    for start in range(0, n, chunk):
        events.extend(render_motion(labels[start:start + chunk], gen, rng, spec))
    return events, labels.numpy()


def render_motion(labels: torch.Tensor, gen: torch.Generator, rng: np.random.Generator,
                  spec: MotionSpec = MotionSpec()) -> list[np.ndarray]:
    """One recording of ``spec.timesteps`` ms per class index in ``labels``, each with a fresh
    texture, drawn from ``gen`` (textures, motions) and ``rng`` (the pixels)."""
    times_us = np.arange(spec.timesteps * _SUBSTEPS + 1) * (1000.0 / _SUBSTEPS)
    tex = _textures(len(labels), gen, spec)
    grid = _sampling_grid(labels, gen, spec)
    m, f = grid.shape[:2]
    video = F.grid_sample(
        tex, grid.reshape(m, f * 32, 32, 2), mode="bilinear", padding_mode="reflection",
        align_corners=False,
    ).reshape(m, f, 32, 32)
    events = video_to_events(video.numpy(), times_us, spec.pixel, rng)
    for ev in events:
        # A crossing exactly at the last frame would fall into bin `timesteps`; keep it inside.
        np.minimum(ev["t"], spec.timesteps * 1000 - 1, out=ev["t"])
    return events
