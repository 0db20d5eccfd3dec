"""From a data config to train and test splits of count frames, ready for the trainer.

Every dataset goes through the same path: events -> transforms -> (T, P, H, W) count frames,
held as one compact uint8 tensor per split (counts above 255 in one bin are clipped).

Every split of a dataset shares one ``SplitLayout``, taken from the training split (or
declared in the config): its class list, so that a class index means the same class in every
split, and its sensor size, which every event of every split is checked against as it is read.
What the reading found that a user should know (empty recordings, dropped events, test samples
that are also training samples) comes back in ``FrameData.warnings``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..config import DataConfig
from ..errors import UnknownClassError
from .cache import CachedDataset
from .datasets.base import EventDataset
from .datasets.dvs_gesture import DVSGesture
from .datasets.embedded import MotionDataset
from .datasets.folder import EventFolder
from .datasets.nmnist import NMNIST
from .datasets.shd import SHD
from .datasets.simulated_nmnist import SimulatedNMNIST
from .events import describe_sensor
from .home import DATA_HOME_VARIABLE, resolve_root
from .sensors import frame_size, geometry_problem
from .synthetic.motion import MotionSpec
from .synthetic.pixel_model import PixelModel
from .transforms import CenterCrop, Compose, Crop, Downsample, RandomTimeSlice, TimeWindow, ToFrame

# Above this the frames of a split would not sit comfortably in memory: say so up front.
MAX_IN_MEMORY_BYTES = 8 * 2**30

# An inferred sensor wider or taller than this is a stray coordinate, not a camera: the largest
# event cameras are about 1280 x 960 pixels (a larger sensor can be declared).
MAX_INFERRED_SIDE = 4096


@dataclass(frozen=True)
class SplitLayout:
    """What every split of a dataset shares: the class list and the sensor size (W, H, P),
    from the training split or declared."""

    classes: tuple[str, ...]
    sensor_size: tuple[int, int, int]
    sensor_origin: str = ""  # '' (the dataset's own), 'declared in ...' or 'inferred from ...'


@dataclass
class FrameData:
    """One split: ``frames`` (N, T, P, H, W) uint8 counts, ``labels`` (N,), class names.

    ``sensor_size`` is the (W, H, P) sensor the events were checked against (``sensor_origin``
    says where it came from: the dataset, the config, or the training split's events); ``sources`` names
    each sample's recording (file and part); ``warnings`` are sentences worth reporting.
    """

    frames: "torch.Tensor | LazyFrames"
    labels: torch.Tensor
    classes: tuple[str, ...]
    sensor_size: tuple[int, int, int] | None = None
    sensor_origin: str = ""
    sources: tuple[tuple[str, str], ...] = ()
    empty_recordings: int = 0
    dropped_events: int = 0
    warnings: list[str] = field(default_factory=list)

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


def _source_id(dataset: EventDataset, i: int) -> tuple[str, str]:
    """A hashable name of sample ``i``'s recording: its real path and the part of it."""
    path, part = dataset.source(i)
    return (os.path.realpath(path), repr(sorted(part.items())) if isinstance(part, dict) else repr(part))


def _read_sample(dataset: EventDataset, i: int) -> tuple[Any, int, int, int]:
    """(transformed sample, label, events kept, events dropped)."""
    events, dropped = dataset.checked_events(i)
    x = dataset.transform(events) if dataset.transform is not None else events
    return x, int(dataset.targets[i]), len(events), dropped


class _Tally:
    """Empty recordings and dropped events of a split, and the sentences that report them."""

    def __init__(self, desc: str, n: int) -> None:
        self.desc, self.n = desc, n
        self.empty = self.dropped = self.dropping = 0
        self.first_empty = None

    def add(self, dataset: EventDataset, i: int, n_events: int, dropped: int) -> None:
        if n_events == 0:
            self.empty += 1
            if self.first_empty is None:
                self.first_empty = dataset.source(i)[0]
        if dropped:
            self.dropped += dropped
            self.dropping += 1

    def finish(self, sensor_size) -> list[str]:
        if self.n and self.empty == self.n:
            raise ValueError(
                f"all {self.n} {self.desc} recordings are empty (no events{' on the sensor' if self.dropped else ''}), "
                f"e.g. {self.first_empty}: there is nothing to learn from")
        notes = []
        if self.empty:
            notes.append(f"{self.empty} of the {self.n} {self.desc} recordings have no events (the first: "
                         f"{self.first_empty}); they are kept as all-zero inputs")
        if self.dropped:
            notes.append(f"dropped {self.dropped} events outside the {describe_sensor(sensor_size)} "
                         f"from {self.dropping} of the {self.n} {self.desc} recordings (data.outside_sensor: drop)")
        return notes


def stack_frames(
    dataset: EventDataset, indices: np.ndarray, classes, desc: str, progress: bool = True,
    cache_dir: str | Path | None = None,
) -> FrameData:
    """Transform the samples ``indices`` of ``dataset`` into one FrameData (with a progress bar).

    Events are checked against the dataset's sensor as they are read (``checked_events``);
    recordings without events are counted, and a split of nothing else is a ``ValueError``.
    A split too large for memory is kept lazily instead, its frames made per batch and cached
    in ``cache_dir`` (when the transform is deterministic, i.e. cacheable); its recordings are
    still all read (and checked) once, here.
    """
    sensor = dataset.sensor_size
    tally = _Tally(desc, len(indices))
    sources = tuple(_source_id(dataset, int(i)) for i in indices)
    first_sample = _read_sample(dataset, int(indices[0])) if len(indices) else (np.zeros((0,)), 0, -1, 0)
    first = np.asarray(first_sample[0])
    nbytes = first.size * len(indices)
    if nbytes > MAX_IN_MEMORY_BYTES:
        for i in indices:
            events, dropped = dataset.checked_events(int(i))
            tally.add(dataset, int(i), len(events), dropped)
        warnings = tally.finish(sensor)
        if cache_dir is not None:
            try:
                dataset = CachedDataset(dataset, cache_dir, dataset.transform)
            except TypeError:  # a random transform (a random time slice) cannot be cached
                pass
        labels = torch.as_tensor(np.asarray(dataset.targets)[indices], dtype=torch.long)
        return FrameData(LazyFrames(dataset, indices, first.shape), labels, tuple(classes), sensor_size=sensor,
                         sources=sources, empty_recordings=tally.empty, dropped_events=tally.dropped,
                         warnings=warnings)
    frames = torch.empty((len(indices), *first.shape), dtype=torch.uint8)
    labels = torch.empty(len(indices), dtype=torch.long)
    bar = tqdm(indices, desc=desc, unit="sample", disable=not progress or len(indices) < 200, leave=False)
    for k, i in enumerate(bar):
        x, y, n_events, dropped = first_sample if k == 0 else _read_sample(dataset, int(i))
        tally.add(dataset, int(i), n_events, dropped)
        frames[k] = torch.from_numpy(np.minimum(np.asarray(x), 255).astype(np.uint8))
        labels[k] = y
    warnings = tally.finish(sensor)
    return FrameData(frames, labels, tuple(classes), sensor_size=sensor, sources=sources,
                     empty_recordings=tally.empty, dropped_events=tally.dropped, warnings=warnings)


def sample_indices(n_available: int, n_wanted: int, seed: int) -> np.ndarray:
    """A seeded random subset of ``range(n_available)``, sorted (all of it when ``n_wanted >= n_available``)."""
    order = np.random.default_rng(seed).permutation(n_available)
    return np.sort(order[: min(n_wanted, n_available)])


def load_split(
    d: DataConfig, split: str, progress: bool = True, layout: SplitLayout | None = None,
) -> FrameData:
    """One split ("train" or "test") of the dataset a data config describes.

    ``layout`` is the training split's (``load_splits`` passes it on); without it, a test split
    takes it from the training split (a folder's inferred sensor reads all its files).
    """
    n = d.n_train if split == "train" else d.n_test
    steps = d.timesteps if split == "train" else (d.test_timesteps or d.timesteps)
    if layout is None and split != "train":
        layout = dataset_layout(d)
    ds = open_dataset(d, split, layout)
    if layout is None:
        layout = _layout_of(d, ds)
    problem = geometry_problem(d, ds.sensor_size, _sensor_name(d, layout))
    if problem is not None:
        raise ValueError(problem)
    ds.transform = frame_transform(d, split, ds.sensor_size, steps)
    idx = sample_indices(len(ds), n, d.seed + (split == "test"))
    cache = Path(d.cache_dir).expanduser() if d.cache_dir else None
    data = stack_frames(ds, idx, ds.classes, f"{d.dataset} {split}", progress, cache)
    data.sensor_origin = layout.sensor_origin
    return data


def load_splits(d: DataConfig, progress: bool = True) -> tuple[FrameData, FrameData]:
    """Both splits with one layout (the training split's), and a warning on the test split when
    some of its samples are training samples too (the same recording, or the same part of one)."""
    train = load_split(d, "train", progress)
    layout = SplitLayout(train.classes, train.sensor_size, train.sensor_origin)
    test = load_split(d, "test", progress, layout)
    shared = set(train.sources) & set(test.sources)
    if shared:
        n_shared = sum(s in shared for s in test.sources)
        hint = ""
        if d.dataset == "folder" and not (resolve_root(d.root) / "test").is_dir():
            hint = f"; give {d.root} train/ and test/ subfolders to keep a test set apart"
        test.warnings.append(
            f"{n_shared} of the {len(test)} test samples are training samples too (the same "
            f"recordings), so the test accuracy does not measure generalisation{hint}")
    return train, test


def dataset_layout(d: DataConfig) -> SplitLayout:
    """The class list and sensor of the dataset ``d`` describes, from its training split."""
    return _layout_of(d, open_dataset(d, "train"))


def _layout_of(d: DataConfig, train_ds: EventDataset) -> SplitLayout:
    inferred = getattr(train_ds, "sensor_inferred_from", None)
    if inferred:
        origin = f"inferred from {inferred}"
    else:
        origin = "declared in data.sensor_size" if d.dataset == "folder" else ""
    return SplitLayout(tuple(train_ds.classes), tuple(train_ds.sensor_size), origin)


def _sensor_name(d: DataConfig, layout: SplitLayout) -> str:
    """The sensor's owner, for messages: 'nmnist', or a folder and where its size came from."""
    if d.dataset != "folder":
        return d.dataset
    if d.sensor_size is None:
        return f"{d.root} ({layout.sensor_origin}; declare data.sensor_size to fix it)"
    return f"{d.root} (data.sensor_size)"


def _folder_roots(d: DataConfig) -> tuple[Path, Path]:
    root = resolve_root(d.root)
    train, test = root / "train", root / "test"
    if train.is_dir() != test.is_dir():
        have, lack = ("train", "test") if train.is_dir() else ("test", "train")
        raise ValueError(f"{root} has a {have}/ folder but no {lack}/ folder: give it both, or "
                         "neither (then both splits read all of it)")
    return (train, test) if train.is_dir() else (root, root)


def open_dataset(d: DataConfig, split: str, layout: SplitLayout | None = None) -> EventDataset:
    """The dataset of one split (``load_split`` gives it ``frame_transform``); a test split gets
    ``layout`` (the training split's classes and sensor) and is checked against it."""
    if d.dataset == "embedded":
        spec = MotionSpec(
            timesteps=d.timesteps, speed=d.speed, contrast=d.contrast, dots_per_view=d.dots_per_view,
            pixel=PixelModel(threshold=d.threshold, noise_rate_hz=d.noise_rate_hz),
        )
        ds = MotionDataset(split, d.n_train if split == "train" else d.n_test, d.seed, spec)
    else:
        ds = _recorded_dataset(d, split, layout)
    if layout is not None and tuple(ds.classes) != tuple(layout.classes):
        theirs, ours = tuple(ds.classes), tuple(layout.classes)
        k = next((k for k, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
        raise ValueError(
            f"the {split} split of {_where(d)} names {len(theirs)} classes and the training split {len(ours)}, "
            f"and they differ at class {k} ({theirs[k] if k < len(theirs) else 'none'!r} here, "
            f"{ours[k] if k < len(ours) else 'none'!r} in training): a class index must mean the same "
            "class in every split")
    if layout is not None and tuple(ds.sensor_size) != tuple(layout.sensor_size):
        raise ValueError(f"the {split} split of {_where(d)} has a {describe_sensor(ds.sensor_size)}, the "
                         f"training split a {describe_sensor(layout.sensor_size)}")
    return ds


def _where(d: DataConfig) -> str:
    """The dataset, for messages: its root folder, or the name of a dataset made here."""
    return str(resolve_root(d.root)) if d.root is not None else f"the {d.dataset} dataset"


def _recorded_dataset(d: DataConfig, split: str, layout: SplitLayout | None) -> EventDataset:
    """The dataset of one split of recordings under ``data.root``."""
    if d.root is None:
        raise FileNotFoundError(f"data.dataset '{d.dataset}' needs data.root, the folder of its files")
    root = resolve_root(d.root)
    if not root.exists() and not d.download and DATA_HOME_VARIABLE in d.root:
        raise FileNotFoundError(
            f"{root} does not exist: data.root {d.root!r} is under {DATA_HOME_VARIABLE}, which is "
            f"{'set to ' + os.environ[DATA_HOME_VARIABLE] if os.environ.get(DATA_HOME_VARIABLE) else 'not set'}; "
            f"point {DATA_HOME_VARIABLE} at the folder that holds your datasets, or set data.root "
            "(or data.download: true where the dataset has a download)")
    if d.dataset == "nmnist":
        return NMNIST(root, split, download=d.download, outside_sensor=d.outside_sensor)
    if d.dataset == "simulated_nmnist":
        return SimulatedNMNIST(root, split, n=(d.n_train if split == "train" else d.n_test), seed=d.seed)
    if d.dataset == "dvsgesture":
        return DVSGesture(root, split, download=d.download, outside_sensor=d.outside_sensor)
    if d.dataset == "shd":
        return SHD(root, split, download=d.download, outside_sensor=d.outside_sensor)
    if d.dataset == "folder":
        return _event_folder(d, split, layout)
    raise ValueError(f"unknown dataset {d.dataset!r}")  # the config's Literal makes this unreachable


def frame_transform(d: DataConfig, split: str, sensor_size: tuple[int, int, int], steps: int) -> Compose:
    """Events of ``sensor_size`` -> the (T, P, H, W) count frames of ``split``: a time window of
    ``steps`` bins (at a random start, drawn once per run from the data seed, for a training split
    with ``data.random_slice``), ``data.downsample`` and ``data.crop``, then binning."""
    duration = steps * d.dt_us
    if split == "train" and d.random_slice:
        window = RandomTimeSlice(duration, seed=d.seed)
    else:
        window = TimeWindow(duration)
    return Compose([window, *_spatial(sensor_size, d), ToFrame(_frame_sensor(sensor_size, d), d.dt_us, steps)])


def _event_folder(d: DataConfig, split: str, layout: SplitLayout | None) -> EventFolder:
    folder = _folder_roots(d)[split == "test"]
    if layout is None:  # the training split: declared classes and sensor, or its own
        try:
            ds = EventFolder(folder, classes=d.classes, sensor_size=d.sensor_size,
                             outside_sensor=d.outside_sensor)
        except UnknownClassError as err:
            raise ValueError(f"class {err.label!r} of {err.path} is not in data.classes "
                             f"({', '.join(map(repr, err.classes))})") from None
        if ds.sensor_inferred_from and max(ds.sensor_size[:2]) > MAX_INFERRED_SIDE:
            w, h, _ = ds.sensor_size
            raise ValueError(
                f"the sensor of {folder} would be {w} x {h}, inferred from {ds.sensor_inferred_from}: "
                f"larger than any event camera ({MAX_INFERRED_SIDE} pixels a side), so a stray "
                "coordinate; fix that file, or declare data.sensor_size if the size is right")
        return ds
    try:
        return EventFolder(folder, classes=layout.classes, sensor_size=layout.sensor_size,
                           outside_sensor=d.outside_sensor)
    except UnknownClassError as err:
        shown = ", ".join(map(repr, err.classes[:20])) + (", ..." if len(err.classes) > 20 else "")
        raise ValueError(
            f"the {split} split has class {err.label!r} ({err.path}) that the training split "
            f"{_folder_roots(d)[0]} lacks (its classes: {shown}); every class must have training "
            "samples, or be listed in data.classes") from None


def _spatial(sensor_size: tuple[int, ...], d: DataConfig) -> list:
    steps: list = []
    if d.downsample > 1:
        w, h = sensor_size[0] // d.downsample, sensor_size[1] // d.downsample
        if (w * d.downsample, h * d.downsample) != tuple(sensor_size[:2]):
            # The incomplete blocks at the right and bottom edges would fall outside the frames.
            steps.append(Crop(0, 0, w * d.downsample, h * d.downsample))
        steps.append(Downsample(d.downsample))
    if d.crop is not None:
        w, h = sensor_size[0] // d.downsample, sensor_size[1] // d.downsample
        steps.append(CenterCrop((w, h), (d.crop, d.crop)))
    return steps


def _frame_sensor(sensor_size: tuple[int, ...], d: DataConfig) -> tuple[int, int, int]:
    w, h = frame_size(d, sensor_size)
    return (w, h, sensor_size[2])

