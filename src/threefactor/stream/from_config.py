"""``threefactor stream``: a stream built from a config (``stream.*``, the network, the rule)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from ..config import Config, dump_config
from ..data.splits import open_dataset
from ..data.transforms import Compose, downsample
from ..errors import RunError
from ..model.network import build_network
from ..rules import make_rule
from ..run.from_config import make_optimizer, resolve_device
from ..run.allocator import retain_freed_memory, share_one_arena
from ..run.directory import CHECKPOINT_NAME
from .learner import StreamLearner, StreamObserver
from .prefetch import SEGMENT_MMAP_THRESHOLD, runs_apart
from .sources import Aedat4Stream, LabelTimeline, MotionStream, ParallelStreams, RecordingStream, Scenario

# Settings a resumed stream may change: they do not change what it computes up to now.
RESUMABLE_STREAM_CHANGES = ("device", "stream.steps", "stream.checkpoint_every_steps",
                            "stream.checkpoint_every_s", "stream.plot_every", "train.progress")


def scenario(cfg: Config) -> Scenario:
    """The ``Scenario`` of ``stream.scenario``: class-incremental phases of two new classes
    each, a domain shift, or sparse labels."""
    s = cfg.stream
    if s.scenario == "class_incremental":
        phases = tuple((k * s.phase_segments, (2 * k, 2 * k + 1)) for k in range(4))
        return Scenario(phases=phases)
    if s.scenario == "domain_shift":
        return Scenario(shift_at=s.shift_at_segment, shift=s.shift)
    if s.scenario == "sparse_labels":
        return Scenario(label_fraction=s.label_fraction)
    return Scenario()


def make_source(cfg: Config):
    """The stream of ``cfg.stream.source``."""
    s = cfg.stream
    try:
        if s.source == "motion" and s.parallel > 1:
            return ParallelStreams([MotionStream(cfg.seed * 1000 + i, s.min_ms, s.max_ms, s.downsample, scenario(cfg))
                                    for i in range(s.parallel)])
        if s.source == "motion":
            return MotionStream(cfg.seed, s.min_ms, s.max_ms, s.downsample, scenario(cfg))
        if s.source == "dataset":
            ds = open_dataset(cfg.data, "train")
            w, h, p = ds.sensor_size
            factor = cfg.data.downsample
            steps = [] if factor == 1 else [lambda ev: downsample(ev, factor)]
            return RecordingStream(ds, cfg.data.dt_us, s.passes, cfg.seed, Compose(steps) if steps else None,
                                   (w // factor, h // factor, p))
        classes = _classes(cfg)
        labels = LabelTimeline.read_csv(s.labels, classes) if s.labels else LabelTimeline()
        return Aedat4Stream(s.path, camera=s.source == "camera", classes=classes, labels=labels,
                            segment_ms=s.segment_ms, downsample=s.downsample)
    except (OSError, ValueError, RuntimeError) as err:
        raise RunError(str(err)) from None


def _classes(cfg: Config) -> tuple[str, ...]:
    if cfg.data.classes:
        return tuple(cfg.data.classes)
    raise RunError("a stream from an AEDAT4 file or a camera needs its class names in data.classes")


def build_stream(cfg: Config, out_dir: str | Path, log: Callable[[str], None] = print,
                 observers: Sequence[StreamObserver] = ()) -> tuple[StreamLearner, object]:
    """The learner (network, rule, optimiser, observers) and the source that ``cfg`` describes."""
    from ..report.stream_plot import StreamPlotObserver

    out = Path(out_dir)
    s = cfg.stream
    device = resolve_device(cfg.device)
    if cfg.rule.name not in ("decolle", "bptt"):
        raise RunError(f"a stream learns with rule.name decolle (or bptt, a baseline), not {cfg.rule.name!r}")
    source = make_source(cfg)
    torch.manual_seed(cfg.seed)
    w, h, p = source.sensor_size
    try:
        network = build_network(cfg.network, (p, h, w), len(source.classes), cfg.seed).to(device)
    except ValueError as err:
        raise RunError(f"cannot build the network for {p} x {h} x {w} frames: {err}") from None
    optimizer = make_optimizer(cfg, network)
    rule = make_rule(cfg, network, optimizer)
    configured = [StreamPlotObserver(out, s.plot_every, title=f"{s.source} stream, {s.scenario}")] \
        if cfg.train.plots else []
    learner = StreamLearner(
        network, rule, optimizer, out, window_steps=s.window_steps,
        checkpoint_every_steps=s.checkpoint_every_steps, checkpoint_every_s=s.checkpoint_every_s,
        learn=s.learn, learn_until=s.learn_until_segment, divergence_factor=cfg.train.divergence_factor,
        observers=[*configured, *observers], progress=cfg.train.progress, log=log, config_text=dump_config(cfg))
    log(f"stream: {s.source} ({s.scenario}), {len(source.classes)} classes, frames {p} x {h} x {w} per "
        f"{getattr(source, 'dt_us', 1000) / 1000:g} ms step; device: {device}")
    return learner, source


def stream(cfg: Config, out_dir: str | Path, log: Callable[[str], None] = print, resume: bool = False,
           observers: Sequence[StreamObserver] = ()) -> dict:
    """Learn from the stream ``cfg`` describes into ``out_dir``; returns the summary.

    The process keeps the buffers it frees (``allocator.retain_freed_memory``, as ``train``
    does). Where the segments are made in this process (a live camera, an AEDAT4 file: see
    ``stream.prefetch``), it hands those of a segment's size back (``SEGMENT_MMAP_THRESHOLD``)
    and its threads share one malloc arena (``allocator.share_one_arena``), so that memory
    stays flat however long the stream runs."""
    if resume and not (Path(out_dir) / CHECKPOINT_NAME).exists():
        raise RunError(f"{out_dir}: no stream to resume there")
    learner, source = build_stream(cfg, out_dir, log, observers)
    if runs_apart(source):
        retain_freed_memory()
    else:
        retain_freed_memory(mmap_threshold=SEGMENT_MMAP_THRESHOLD)
        share_one_arena()
    return learner.run(source, cfg.stream.steps, resume=resume)
