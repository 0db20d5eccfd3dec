"""Unbounded event streams, as segments of count frames played back to back in continuous time.

A source is an iterator of ``Segment``s: the frames (T, P, H, W) of one stretch of the stream
in which the label does not change (``UNLABELLED`` where no label is known), numbered from 0.
``seek(segment)`` restarts it at a segment, so a stream resumes exactly where a checkpoint left
it. A network learning from a stream keeps its state across segments: their boundaries are only
where the label may change.

- ``MotionStream``: the embedded motion generator without end; each segment's class, length and
  texture are drawn from the stream's seed and the segment's number. It also makes the
  non-stationary scenarios (``Scenario``): classes appearing in phases, a domain shift (faster
  motion, or a sensor that loses most OFF events), labels on only a fraction of the segments.
- ``RecordingStream``: the recordings of any ``EventDataset`` (N-MNIST, DVS Gesture, a folder of
  your own) one after another, in a new seeded order every pass, for ``passes`` passes or forever.
- ``ParallelStreams``: several sources of equal-length segments learning side by side, as one
  batch (each keeps its own state; every step sees several classes at once).
- ``Aedat4Stream``: an AEDAT4 file, or a live camera, through iniVation's ``dv-processing``
  (``pip install dv-processing``), cut into segments at label changes (``LabelTimeline``) or
  every ``segment_ms``.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch

from ..data.events import make_events
from ..data.synthetic.motion import MOTION_CLASSES, SENSOR_SIZE, MotionSpec, render_motion
from ..data.transforms import downsample, to_frame
from ..errors import DataFileError

UNLABELLED = -1


class Segment(NamedTuple):
    """One stretch of the stream: ``frames`` (T, P, H, W) float32 counts of ``dt_us`` bins,
    ``label`` (the class index the learner is given, or ``UNLABELLED``), its number, its start in
    stream time, and ``truth``: the class where the source knows it (what accuracy is measured
    against, also on segments whose label the learner is not given)."""

    index: int
    frames: torch.Tensor
    label: int
    start_us: int
    truth: int = UNLABELLED


def _seed(*parts: object) -> int:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class Source:
    """What every stream is: an iterator of ``Segment``s numbered from 0, which ``seek`` restarts
    at any segment (the segment's start in stream time given), so a stream resumes exactly."""

    dt_us = 1000
    runs_apart = True  # it can be made in another process (``stream.prefetch``)

    def __init__(self) -> None:
        self.next_index = 0
        self._start_us = 0

    def seek(self, segment: int, start_us: int) -> None:
        """Continue with segment ``segment``, which starts at ``start_us`` of stream time."""
        self.next_index, self._start_us = segment, start_us

    def __iter__(self) -> Iterator[Segment]:
        return self


@dataclass(frozen=True)
class Scenario:
    """How a ``MotionStream`` changes over its segments.

    ``phases``: class-incremental learning, a list of (first segment, classes present from
    then on); empty: all classes from the start. ``shift_at``: the segment from which the
    domain is shifted (``shift``: ``speed``, motion ``speed_factor`` times faster, or
    ``polarity``, the sensor drops ``off_drop`` of its OFF events). ``label_fraction``: the
    fraction of segments that carry their label (the others are ``UNLABELLED``).
    """

    phases: tuple[tuple[int, tuple[int, ...]], ...] = ()
    shift_at: int | None = None
    shift: str = "speed"
    speed_factor: float = 2.0
    off_drop: float = 0.7
    label_fraction: float = 1.0

    def classes_at(self, segment: int, n_classes: int) -> tuple[int, ...]:
        present = tuple(range(n_classes))
        for start, classes in self.phases:
            if segment >= start:
                present = tuple(classes)
        return present

    def shifted(self, segment: int) -> bool:
        return self.shift_at is not None and segment >= self.shift_at


class MotionStream(Source):
    """The embedded motion dataset as an endless stream: segments of ``min_ms`` to ``max_ms``
    ms (1 ms steps), each one random class with a fresh texture, deterministic by ``seed``.
    Frames are summed over ``downsample`` x ``downsample`` pixel blocks (2: 16 x 16)."""

    classes = MOTION_CLASSES

    def __init__(self, seed: int = 0, min_ms: int = 60, max_ms: int = 200, downsample: int = 1,
                 scenario: Scenario = Scenario(), spec: MotionSpec = MotionSpec()) -> None:
        if not 1 <= min_ms <= max_ms:
            raise ValueError(f"segment lengths must satisfy 1 <= min_ms <= max_ms, got {min_ms} and {max_ms}")
        if SENSOR_SIZE[0] % downsample:
            raise ValueError(f"downsample {downsample} does not divide the {SENSOR_SIZE[0]}-pixel sensor")
        self.seed, self.min_ms, self.max_ms, self.factor = seed, min_ms, max_ms, downsample
        self.scenario, self.spec = scenario, spec
        w, h, p = SENSOR_SIZE
        self.sensor_size = (w // downsample, h // downsample, p)
        super().__init__()

    def plan(self, k: int) -> tuple[int, int, bool, np.random.Generator]:
        """Segment ``k``'s class, length in steps and whether it is labelled, without making it
        (and the generator its pixels are then drawn from)."""
        sc = self.scenario
        rng = np.random.default_rng(_seed("motion-stream", self.seed, k))
        present = sc.classes_at(k, len(self.classes))
        label = int(present[rng.integers(len(present))])
        steps = int(rng.integers(self.min_ms, self.max_ms + 1))
        labelled = bool(rng.random() < sc.label_fraction)
        return label, steps, labelled, rng

    def start_of(self, k: int) -> int:
        """Stream time (us) at which segment ``k`` starts."""
        return sum(self.plan(i)[1] for i in range(k)) * self.dt_us

    def __next__(self) -> Segment:
        k = self.next_index
        sc = self.scenario
        label, steps, labelled, rng = self.plan(k)
        spec = MotionSpec(**{**self.spec.__dict__, "timesteps": steps})
        if sc.shifted(k) and sc.shift == "speed":
            spec = MotionSpec(**{**spec.__dict__, "speed": spec.speed * sc.speed_factor})
        gen = torch.Generator().manual_seed(_seed("motion-texture", self.seed, k))
        events = render_motion(torch.tensor([label]), gen, rng, spec)[0]
        if sc.shifted(k) and sc.shift == "polarity":
            events = events[(events["p"] == 1) | (rng.random(len(events)) >= sc.off_drop)]
        if self.factor > 1:
            events = downsample(events, self.factor)
        frames = torch.from_numpy(to_frame(events, self.sensor_size, self.dt_us, steps))
        segment = Segment(k, frames, label if labelled else UNLABELLED, self._start_us, label)
        self.next_index, self._start_us = k + 1, self._start_us + steps * self.dt_us
        return segment


class RecordingStream(Source):
    """The recordings of ``dataset`` (an ``EventDataset``) played back to back: each pass in a
    new order drawn from ``seed``, for ``passes`` passes (None: forever). Each recording becomes
    one segment of ``ceil(duration / dt_us)`` steps (events from its own first timestamp on),
    labelled with its class; ``transform`` (events -> events, e.g. a crop) comes first."""

    def __init__(self, dataset, dt_us: int = 1000, passes: int | None = None, seed: int = 0,
                 transform: Callable[[np.ndarray], np.ndarray] | None = None,
                 sensor_size: tuple[int, int, int] | None = None) -> None:
        if len(dataset) == 0:
            raise ValueError("the dataset to stream has no recordings")
        self.dataset, self.dt_us, self.passes, self.seed = dataset, dt_us, passes, seed
        self.transform = transform
        self.classes = tuple(dataset.classes)
        self.sensor_size = tuple(sensor_size or dataset.sensor_size)
        super().__init__()

    def __next__(self) -> Segment:
        k, n = self.next_index, len(self.dataset)
        pass_, i = divmod(k, n)
        if self.passes is not None and pass_ >= self.passes:
            raise StopIteration
        order = np.random.default_rng(_seed("recording-stream", self.seed, pass_)).permutation(n)
        j = int(order[i])
        events, _ = self.dataset.checked_events(j)
        if self.transform is not None:
            events = self.transform(events)
        if len(events):
            events = events.copy()
            events["t"] -= events["t"].min()
        steps = max(1, math.ceil((int(events["t"].max()) + 1) / self.dt_us)) if len(events) else 1
        frames = torch.from_numpy(to_frame(events, self.sensor_size, self.dt_us, steps))
        label = int(self.dataset.targets[j])
        segment = Segment(k, frames, label, self._start_us, label)
        self.next_index, self._start_us = k + 1, self._start_us + steps * self.dt_us
        return segment


@dataclass(frozen=True)
class LabelTimeline:
    """Labels of a recording or a live stream in time: intervals ``(start_us, end_us, class)``;
    time outside every interval is unlabelled."""

    intervals: tuple[tuple[int, int, int], ...] = ()

    @classmethod
    def read_csv(cls, path: str | os.PathLike, classes: Sequence[str]) -> "LabelTimeline":
        """``start_us,end_us,class`` rows (a header row is allowed; a class by name or index)."""
        rows = []
        with open(path, newline="") as f:
            for n, row in enumerate(csv.reader(f), start=1):
                if not row or (n == 1 and not row[0].strip().lstrip("-").isdigit()):
                    continue  # a header
                if len(row) != 3:
                    raise DataFileError(path, f"line {n} has {len(row)} fields, not start_us,end_us,class")
                try:
                    start, end = int(row[0]), int(row[1])
                except ValueError:
                    raise DataFileError(path, f"line {n}: start_us and end_us must be integers, got "
                                              f"{row[0]!r} and {row[1]!r}") from None
                name = row[2].strip()
                label = classes.index(name) if name in classes else int(name) if name.isdigit() else None
                if label is None or not 0 <= label < len(classes):
                    raise DataFileError(path, f"line {n}: class {name!r} is not one of {list(classes)}")
                if end <= start:
                    raise DataFileError(path, f"line {n}: end {end} is not after start {start}")
                rows.append((start, end, label))
        return cls(tuple(sorted(rows)))

    def label_at(self, t_us: int) -> int:
        for start, end, label in self.intervals:
            if start <= t_us < end:
                return label
        return UNLABELLED

    def boundaries(self) -> list[int]:
        return sorted({t for start, end, _ in self.intervals for t in (start, end)})


class Aedat4Stream:
    """Events of an AEDAT4 file (``path``) or of a live camera (``camera=True``, the first one
    ``dv-processing`` finds) as segments: cut where ``labels`` changes and at most every
    ``segment_ms``; a live camera's label comes from ``labels`` (stream time since its first
    event) or from ``label_fn(start_us)``, called at every segment (e.g. reading a key)."""

    runs_apart = False  # a live device, or a reader that stays in this process

    def __init__(self, path: str | os.PathLike | None = None, *, camera: bool = False,
                 classes: Sequence[str] = (), labels: LabelTimeline = LabelTimeline(),
                 label_fn: Callable[[int], int] | None = None, dt_us: int = 1000,
                 segment_ms: int = 100, downsample: int = 1) -> None:
        try:
            import dv_processing as dv
        except ImportError:
            raise RuntimeError("AEDAT4 files and live cameras are read through iniVation's dv-processing: "
                               "pip install dv-processing") from None
        if (path is None) == (not camera):
            raise ValueError("give either an AEDAT4 file or camera=True")
        if path is not None and not Path(path).is_file():
            raise DataFileError(path, "no such file")
        try:
            self.reader = dv.io.CameraCapture() if camera else dv.io.MonoCameraRecording(str(path))
        except RuntimeError as err:
            raise DataFileError(path, f"not an AEDAT4 recording that dv-processing reads ({err})") from None
        if not self.reader.isEventStreamAvailable():
            raise DataFileError(path, "it holds no event stream")
        w, h = self.reader.getEventResolution()
        self.factor = downsample
        self.sensor_size = (w // downsample, h // downsample, 2)
        self.classes, self.labels, self.label_fn = tuple(classes), labels, label_fn
        self.dt_us, self.segment_us = dt_us, segment_ms * 1000
        self.path = path
        self.next_index = 0
        self._t0: int | None = None  # the first event's timestamp: stream time 0
        self._cursor = 0  # stream time up to which events were cut into segments
        self._pending = make_events([], [], [], [])
        self._ended = False

    def seek(self, segment: int, start_us: int) -> None:
        """Skip to stream time ``start_us`` (a file only; a live camera cannot go back)."""
        while self._cursor < start_us and not self._ended:
            self._fill(start_us)
            self._pending = self._pending[self._pending["t"] >= start_us]
            self._cursor = min(start_us, self._latest())
        self.next_index = segment

    def _latest(self) -> int:
        return int(self._pending["t"].max()) + 1 if len(self._pending) else self._cursor

    def _fill(self, until_us: int) -> None:
        """Read batches until an event at or after ``until_us`` (stream time) or the end."""
        while not self._ended and (not len(self._pending) or self._pending["t"].max() < until_us):
            if not self.reader.isRunning():
                self._ended = True
                break
            batch = self.reader.getNextEventBatch()
            if batch is None:
                if self.path is not None:
                    self._ended = True
                continue
            a = batch.numpy()
            if not len(a):
                continue
            if self._t0 is None:
                self._t0 = int(a["timestamp"][0])
            x, y = a["x"].astype(np.int64), a["y"].astype(np.int64)
            ev = make_events(x // self.factor, y // self.factor, a["timestamp"] - self._t0, a["polarity"])
            self._pending = np.concatenate([self._pending, ev])

    def __iter__(self) -> Iterator[Segment]:
        return self

    def __next__(self) -> Segment:
        start = self._cursor
        end = start + self.segment_us
        for b in self.labels.boundaries():
            if start < b < end:
                end = b
                break
        self._fill(end)
        if self._ended and not len(self._pending):
            raise StopIteration
        if self._ended:
            end = min(end, self._latest())
        inside = self._pending["t"] < end
        events = self._pending[inside].copy()
        self._pending = self._pending[~inside]
        events["t"] -= start
        steps = max(1, math.ceil((end - start) / self.dt_us))
        frames = torch.from_numpy(to_frame(events, self.sensor_size, self.dt_us, steps))
        label = self.label_fn(start) if self.label_fn is not None else self.labels.label_at(start)
        segment = Segment(self.next_index, frames, int(label), start, int(label))
        self.next_index, self._cursor = self.next_index + 1, start + steps * self.dt_us
        return segment


class ParallelStreams:
    """``sources`` side by side as one batch: segment k is the k-th segment of every source,
    frames (B, T, P, H, W), ``label`` and ``truth`` (B,) tensors. The sources must make segments
    of equal lengths (e.g. ``MotionStream``s with ``min_ms == max_ms`` and different seeds); the
    network keeps one state per source. A batch is learned from only where every source gives
    its label."""

    def __init__(self, sources: Sequence) -> None:
        if not sources:
            raise ValueError("ParallelStreams needs at least one source")
        self.sources = list(sources)
        first = self.sources[0]
        self.classes, self.sensor_size = first.classes, first.sensor_size
        self.dt_us = getattr(first, "dt_us", 1000)
        self.runs_apart = all(getattr(s, "runs_apart", False) for s in self.sources)
        self.next_index = 0

    def seek(self, segment: int, start_us: int) -> None:
        for s in self.sources:
            s.seek(segment, start_us)
        self.next_index = segment

    def __iter__(self) -> Iterator[Segment]:
        return self

    def __next__(self) -> Segment:
        parts = [next(s) for s in self.sources]
        lengths = {len(p.frames) for p in parts}
        if len(lengths) > 1:
            raise ValueError(f"parallel streams need segments of one length, got {sorted(lengths)} at segment "
                             f"{self.next_index}")
        self.next_index += 1
        return Segment(parts[0].index, torch.stack([p.frames for p in parts]),
                       torch.tensor([p.label for p in parts]), parts[0].start_us,
                       torch.tensor([p.truth for p in parts]))
