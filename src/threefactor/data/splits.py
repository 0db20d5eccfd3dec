"""From a data config to train and test splits of count frames, ready for the trainer.

Every dataset goes through the same path: events -> transforms -> (T, P, H, W) count frames,
held as one compact uint8 tensor per split (counts above 255 in one bin are clipped).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from .transforms import CenterCrop, Compose, Downsample, RandomTimeSlice, TimeWindow, ToFrame

if TYPE_CHECKING:
    from ..config import DataConfig

# Above this the frames of a split would not sit comfortably in memory: say so up front.
MAX_IN_MEMORY_BYTES = 8 * 2**30


@dataclass
class FrameData:
    """One split: ``frames`` (N, T, P, H, W) uint8 counts, ``labels`` (N,), class names."""

    frames: "torch.Tensor | LazyFrames"
    labels: torch.Tensor
    classes: tuple[str, ...]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.frames.shape[2:])

    def __len__(self) -> int:
        return len(self.labels)


class LazyFrames:
    """Frames made on demand (through an on-disk cache) for splits too large for memory.

    Indexed like the uint8 tensor it stands for: ``frames[idx]`` with a slice, a list or a
    tensor of indices gives a (len(idx), T, P, H, W) uint8 tensor.
    """

    def __init__(self, dataset, indices: np.ndarray, sample_shape: tuple[int, ...]) -> None:
        self.dataset, self.indices, self.sample_shape = dataset, np.asarray(indices), sample_shape

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.indices), *self.sample_shape)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, torch.Tensor):
            idx = idx.cpu().numpy()
        picked = np.atleast_1d(self.indices[idx])
        out = torch.empty((len(picked), *self.sample_shape), dtype=torch.uint8)
        for k, i in enumerate(picked):
            out[k] = torch.from_numpy(np.minimum(np.asarray(self.dataset[int(i)][0]), 255).astype(np.uint8))
        return out


def stack_frames(
    dataset, indices: np.ndarray, classes, desc: str, progress: bool = True,
    cache_dir: str | Path | None = None,
) -> FrameData:
    """Transform the samples ``indices`` of ``dataset`` into one FrameData (with a progress bar).

    A split too large for memory is kept lazily instead, its frames made per batch and cached
    in ``cache_dir`` (when the transform is deterministic, i.e. cacheable).
    """
    first = np.asarray(dataset[int(indices[0])][0]) if len(indices) else np.zeros((0,))
    nbytes = first.size * len(indices)
    if nbytes > MAX_IN_MEMORY_BYTES:
        if cache_dir is not None:
            from .cache import CachedDataset

            try:
                dataset = CachedDataset(dataset, cache_dir, dataset.transform)
            except TypeError:  # a random transform (a random time slice) cannot be cached
                pass
        labels = torch.as_tensor(np.asarray(dataset.targets)[indices], dtype=torch.long)
        return FrameData(LazyFrames(dataset, indices, first.shape), labels, tuple(classes))
    frames = torch.empty((len(indices), *first.shape), dtype=torch.uint8)
    labels = torch.empty(len(indices), dtype=torch.long)
    bar = tqdm(indices, desc=desc, unit="sample", disable=not progress or len(indices) < 200, leave=False)
    for k, i in enumerate(bar):
        x, y = dataset[int(i)]
        frames[k] = torch.from_numpy(np.minimum(np.asarray(x), 255).astype(np.uint8))
        labels[k] = int(y)
    return FrameData(frames, labels, tuple(classes))


def _subset(n_available: int, n_wanted: int, seed: int) -> np.ndarray:
    """A seeded random subset (all of them, shuffled, when ``n_wanted >= n_available``)."""
    order = np.random.default_rng(seed).permutation(n_available)
    return np.sort(order[: min(n_wanted, n_available)])


def load_split(d: "DataConfig", split: str, progress: bool = True) -> FrameData:
    """One split ("train" or "test") of the dataset a data config describes."""
    n = d.n_train if split == "train" else d.n_test
    if d.dataset == "embedded":
        from .embedded import MotionDataset, MotionSpec
        from .pixel_model import PixelModel

        spec = MotionSpec(
            timesteps=d.timesteps, speed=d.speed, contrast=d.contrast, dots_per_view=d.dots_per_view,
            pixel=PixelModel(threshold=d.threshold, noise_rate_hz=d.noise_rate_hz),
        )
        ds = MotionDataset(split, n, d.seed, spec)
        return stack_frames(ds, np.arange(len(ds)), ds.classes, f"{split} frames", progress)

    steps = d.timesteps if split == "train" else (d.test_timesteps or d.timesteps)
    ds, window = _file_dataset(d, split, steps)
    to_frame = ToFrame(_frame_sensor(ds.sensor_size, d), d.dt_us, steps)
    ds.transform = Compose([*window, *_spatial(ds.sensor_size, d), to_frame])
    idx = _subset(len(ds), n, d.seed + (split == "test"))
    cache = Path(d.cache_dir).expanduser() if d.cache_dir else None
    return stack_frames(ds, idx, ds.classes, f"{d.dataset} {split}", progress, cache)


def load_splits(d: "DataConfig", progress: bool = True) -> tuple[FrameData, FrameData]:
    return load_split(d, "train", progress), load_split(d, "test", progress)


def _file_dataset(d: "DataConfig", split: str, steps: int):
    if d.root is None:
        raise FileNotFoundError(f"data.dataset '{d.dataset}' needs data.root, the folder of its files")
    root = Path(d.root).expanduser()
    window: list = []
    if d.dataset == "nmnist":
        from .nmnist import NMNIST

        ds = NMNIST(root, split, download=d.download)
    elif d.dataset == "simulated_nmnist":
        from .saccades import SimulatedNMNIST

        ds = SimulatedNMNIST(root, split, n=(d.n_train if split == "train" else d.n_test), seed=d.seed)
    elif d.dataset == "dvsgesture":
        from .gesture import DVSGesture

        ds = DVSGesture(root, split, download=d.download)
    elif d.dataset == "shd":
        from .shd import SHD

        ds = SHD(root, split, download=d.download)
    elif d.dataset == "folder":
        from .folder import EventFolder

        ds = EventFolder(root / split if (root / split).is_dir() else root)
    else:  # the config's Literal makes this unreachable
        raise ValueError(f"unknown dataset {d.dataset!r}")
    duration = steps * d.dt_us
    if split == "train" and d.random_slice:
        # Drawn once per run from the data seed (frames are built once and kept in memory).
        window = [RandomTimeSlice(duration, seed=d.seed)]
    else:
        window = [TimeWindow(duration)]
    return ds, window


def _spatial(sensor_size: tuple[int, ...], d: "DataConfig") -> list:
    steps: list = []
    if d.downsample > 1:
        steps.append(Downsample(d.downsample))
    if d.crop is not None:
        w, h = sensor_size[0] // d.downsample, sensor_size[1] // d.downsample
        steps.append(CenterCrop((w, h), (d.crop, d.crop)))
    return steps


def _frame_sensor(sensor_size: tuple[int, ...], d: "DataConfig") -> tuple[int, int, int]:
    w, h, p = sensor_size
    w, h = w // d.downsample, h // d.downsample
    if d.crop is not None:
        w, h = d.crop, d.crop
    return (w, h, p)
