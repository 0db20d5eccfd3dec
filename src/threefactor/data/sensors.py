"""The sensors of the datasets whose sensor is fixed, and what a data config's size settings
make of a sensor: the frame size, and why the settings do not fit it.

Nothing here imports the config: the config checks its settings with these functions, and the
functions read only the few settings that ``FrameSettings`` names.
"""

from __future__ import annotations

from typing import Protocol

# The sensors (W, H, P) of the datasets whose sensor is fixed; a folder's is declared or inferred.
KNOWN_SENSORS: dict[str, tuple[int, int, int]] = {
    "nmnist": (34, 34, 2), "simulated_nmnist": (34, 34, 2), "dvsgesture": (128, 128, 2),
    "shd": (700, 1, 1),
}

# Binning one sample makes a count per (time bin, polarity, pixel), as int64 and float32: above
# this many, a sensor size or a number of time steps is surely a mistake, not a plan.
MAX_SAMPLE_VALUES = 2**27


class FrameSettings(Protocol):
    """The settings of a data config that decide the size of a sample's frames."""

    downsample: int
    crop: int | None
    timesteps: int
    test_timesteps: int | None


def frame_size(d: FrameSettings, sensor_size: tuple[int, int, int]) -> tuple[int, int]:
    """(W, H) of the frames a sensor gives after ``data.downsample`` and ``data.crop``."""
    if d.crop is not None:
        return d.crop, d.crop
    return sensor_size[0] // d.downsample, sensor_size[1] // d.downsample


def geometry_problem(d: FrameSettings, sensor_size: tuple[int, int, int], sensor_name: str) -> str | None:
    """Why the size settings of ``d`` do not fit ``sensor_size`` (the sensor of ``sensor_name``),
    or None: downsampling and cropping must leave at least one pixel, and one sample's count
    frames must stay below ``MAX_SAMPLE_VALUES``."""
    width, height, n_pol = sensor_size
    f = d.downsample
    if width // f < 1 or height // f < 1:
        return (f"'data.downsample' ({f}) is larger than the {width} x {height} sensor of {sensor_name}, "
                "so no pixel would be left")
    if d.crop is not None and (d.crop > width // f or d.crop > height // f):
        after = f" after 'data.downsample' {f}" if f > 1 else ""
        return (f"'data.crop' ({d.crop}) is larger than the {width // f} x {height // f} frames of "
                f"{sensor_name}{after}")
    w, h = frame_size(d, sensor_size)
    steps = max(d.timesteps, d.test_timesteps or 0)
    values = steps * n_pol * h * w
    if values > MAX_SAMPLE_VALUES:
        return (f"one sample's frames would hold {steps} x {n_pol} x {h} x {w} = {values:,} counts "
                f"({values * 12 / 2**30:.0f} GiB to bin), from the {width} x {height} sensor of "
                f"{sensor_name}; lower data.timesteps or crop or downsample the frames")
    return None
