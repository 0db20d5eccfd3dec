"""``threefactor train``: a run built from a config, trained by the library's ``Trainer``.

``train(cfg, out_dir)`` loads the config's dataset as count frames, builds the network (LSUV
initialisation for a new run), the optimiser, the learning-rate schedule and the rule, and
hands them to ``Trainer`` with the config as the run's ``config.yaml``, the classes, input shape
and sensor as checkpoint metadata, and the observers the config asks for (TensorBoard, plots).
A resumed run keeps its settings: only ``RESUMABLE_CHANGES`` may differ from the checkpoint's
config. Under ``torchrun`` the processes load the data in turn (the first of every node first:
it may download and fill the frame cache), then train together.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from ..config import Config, dump_config, to_dict
from ..data.splits import FrameData, SplitLayout
from ..data.splits import load_split as load_frames_split
from ..data.splits import load_splits as load_frames_splits
from ..errors import DistributedError, RunError
from ..model.init import lsuv_init
from ..model.network import DecolleNetwork, build_network
from ..report.plots import PlotsObserver
from ..report.tensorboard import TensorBoardObserver
from ..rules import make_rule
from ..rules.common import resolve_loss
from . import collective
from .allocator import retain_freed_memory
from .collective import DistInfo
from .directory import RunDirectory
from .optim import Adamax
from .collective import together
from .observer import Observer
from .trainer import Trainer, open_run_directory

# Settings a resumed run may change: they do not change what the run computes.
RESUMABLE_CHANGES = (
    "device", "train.epochs", "train.progress", "train.checkpoint_every", "train.eval_every",
    "train.tensorboard", "train.plots", "train.eval_batch_size", "train.divergence_factor",
)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RunError(f"device {name!r} was asked for, but this PyTorch sees no CUDA device")
    try:
        return torch.device(name)
    except RuntimeError:
        raise RunError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None


def load_split(cfg: Config, split: str, layout: SplitLayout | None = None) -> FrameData:
    """One split ("train" or "test") of the run's dataset, as count frames; ``layout`` (classes
    and sensor) is the training split's, e.g. from a checkpoint, when known."""
    try:
        return load_frames_split(cfg.data, split, cfg.train.progress, layout)
    except (OSError, ValueError, MemoryError) as err:  # missing or unreadable files, bad sizes
        raise RunError(str(err)) from None


def load_data(cfg: Config) -> tuple[FrameData, FrameData]:
    """Both splits, with the training split's classes and sensor, checked against each other."""
    try:
        train_data, test_data = load_frames_splits(cfg.data, cfg.train.progress)
    except (OSError, ValueError, MemoryError) as err:
        raise RunError(str(err)) from None
    if train_data.input_shape != test_data.input_shape:  # the layout makes this a bug, not a user's error
        raise RunError(f"the test frames have shape {list(test_data.input_shape)}, the training frames "
                       f"{list(train_data.input_shape)}")
    return train_data, test_data


def make_optimizer(cfg: Config, network: DecolleNetwork) -> torch.optim.Optimizer:
    o = cfg.optim
    scales = o.layer_lr_scale or [1.0] * len(network.layers)
    groups = [
        {"params": list(layer.parameters()), "lr": o.lr * s}
        for layer, s in zip(network.layers, scales)
    ]
    if o.name == "adamax":
        # torch's, with a lean step (optim.py); rule.compile fuses its update too
        return Adamax(groups, lr=o.lr, betas=o.betas, compile=cfg.rule.compile)
    if o.name == "adam":
        return torch.optim.Adam(groups, lr=o.lr, betas=o.betas, foreach=True)
    return torch.optim.SGD(groups, lr=o.lr, foreach=True)


def make_scheduler(cfg: Config, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.StepLR:
    """lr divided by ``optim.lr_decay_factor`` every ``optim.lr_decay_every`` epochs (0: never)."""
    o = cfg.optim
    if o.lr_decay_every:
        return torch.optim.lr_scheduler.StepLR(optimizer, o.lr_decay_every, 1.0 / o.lr_decay_factor)
    return torch.optim.lr_scheduler.StepLR(optimizer, 1, 1.0)  # x 1.0 is exact: constant lr


class FrameBatches:
    """Batches ``(frames, labels)`` of in-memory count frames, in an order drawn from torch's
    random stream when iterated (``shuffle``), else in order."""

    def __init__(self, data: FrameData, batch_size: int, shuffle: bool = True) -> None:
        self.data, self.batch_size, self.shuffle = data, batch_size, shuffle

    def __len__(self) -> int:
        return -(-len(self.data.labels) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.data.labels)
        order = torch.randperm(n) if self.shuffle else torch.arange(n)
        for i in range(0, n, self.batch_size):
            idx = order[i:i + self.batch_size]
            yield self.data.frames[idx], self.data.labels[idx]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flat(v, key))
        else:
            out[key] = v
    return out


def check_resume_config(cfg: Config, payload: dict, where: Path) -> None:
    import yaml

    saved = _flat(yaml.safe_load(payload["config"]))
    now = _flat(to_dict(cfg))
    defaults = _flat(to_dict(Config()))  # a key newer than the checkpoint: it ran with the default
    for key in sorted(set(saved) | set(now)):
        if key in RESUMABLE_CHANGES:
            continue
        was = saved.get(key, defaults.get(key))
        if was != now.get(key):
            raise RunError(
                f"{where}: config.yaml sets '{key}' to {now.get(key)!r} but the checkpoint was "
                f"trained with {was!r}; a resumed run keeps its settings (only "
                f"{', '.join(RESUMABLE_CHANGES)} may change)"
            )


def train(
    cfg: Config,
    out_dir: str | Path,
    log: Callable[[str], None] = print,
    resume: bool = False,
    observers: Sequence[Observer] = (),
) -> dict:
    """Train ``cfg`` into the run directory ``out_dir`` and return the summary.

    With ``resume`` the run in ``out_dir`` continues from its checkpoint (``cfg`` should be the
    run's own config.yaml; see ``RESUMABLE_CHANGES``). ``observers`` are added to the ones the
    config asks for. Under torchrun the processes train together; process 0 writes ``out_dir``
    and calls ``log``. The process keeps the memory it frees (``allocator.retain_freed_memory``),
    so the buffers every step reallocates are not page-faulted in again.
    """
    retain_freed_memory()
    out = Path(out_dir)
    try:
        info = collective.env_info()
        resolve_loss(cfg.rule.loss)  # a user cost that does not import: before anything is read
    except (DistributedError, ValueError) as err:
        raise RunError(str(err)) from None
    device = resolve_device(cfg.device)  # a bad device: refused before anything is read or written
    owned_group = False
    try:
        if info.enabled and not collective.group_ready():
            try:
                info, device = collective.init_from_env(device)
            except DistributedError as err:
                raise RunError(str(err)) from None
            owned_group = True
        return _train(cfg, out, log, resume, observers, device, info)
    finally:
        if owned_group:
            collective.teardown()


def _train(cfg: Config, out: Path, log, resume: bool, observers: Sequence[Observer],
           device: torch.device, info: DistInfo) -> dict:
    quiet = log if info.is_main else (lambda message: None)
    # checked (and locked) before the data is read: a run that cannot be written fails at once
    run_dir = open_run_directory(out, dump_config(cfg), resume, info, quiet)
    try:
        return _train_in(run_dir, cfg, out, log, quiet, resume, observers, device, info)
    finally:
        run_dir.close()


def _train_in(run_dir: RunDirectory, cfg: Config, out: Path, log, quiet, resume: bool,
              observers: Sequence[Observer], device: torch.device, info: DistInfo) -> dict:
    torch.manual_seed(cfg.seed)
    train_data, test_data = load_data_in_turn(cfg, info)
    sensor = ""
    if train_data.sensor_size is not None:
        w, h, p = train_data.sensor_size
        origin = f" ({train_data.sensor_origin})" if train_data.sensor_origin else ""
        sensor = f" from a {w} x {h} x {p} sensor{origin}"
    quiet(f"data: {len(train_data.labels)} train / {len(test_data.labels)} test samples of shape "
          f"{tuple(train_data.frames.shape[1:])}{sensor}, {len(train_data.classes)} classes; device: {device}")
    for note in [*train_data.warnings, *test_data.warnings]:
        quiet(f"warning: {note}")
    try:
        network = build_network(cfg.network, tuple(train_data.input_shape), len(train_data.classes), cfg.seed)
    except ValueError as err:
        raise RunError(f"cannot build the network for inputs of shape {list(train_data.input_shape)}: {err}") from None
    network.to(device)
    if cfg.network.init == "lsuv" and run_dir.fresh:
        sample = train_data.frames[: min(64, len(train_data.labels))].to(device, torch.float32)
        stats = lsuv_init(network, sample, cfg.network.init_target_mean, skip_steps=cfg.rule.burn_in)
        quiet("init: LSUV, membrane (mean, var) per layer: " + ", ".join(f"({m:.2f}, {v:.2f})" for m, v in stats))
    optimizer = make_optimizer(cfg, network)
    rule = make_rule(cfg, network, optimizer)  # rule.name: decolle | stllr | bptt
    quiet(f"precision: {rule.precision} (train.precision: {cfg.train.precision})")
    configured: list[Observer] = []
    if cfg.train.tensorboard:
        configured.append(TensorBoardObserver(out))
    if cfg.train.plots:
        configured.append(PlotsObserver(test_data.frames[0], int(test_data.labels[0]), test_data.classes,
                                        burn_in=cfg.rule.burn_in, dt_ms=cfg.data.dt_us / 1000.0))
    meta = {"classes": list(train_data.classes), "input_shape": list(train_data.input_shape),
            "sensor_size": None if train_data.sensor_size is None else [int(v) for v in train_data.sensor_size]}
    trainer = Trainer(
        network, rule, optimizer, out, epochs=cfg.train.epochs, scheduler=make_scheduler(cfg, optimizer),
        loss=resolve_loss(cfg.rule.loss), burn_in=cfg.rule.burn_in,
        checkpoint_every=cfg.train.checkpoint_every, eval_every=cfg.train.eval_every,
        divergence_factor=cfg.train.divergence_factor, seed=cfg.seed,
        observers=[*configured, *observers], progress=cfg.train.progress, log=log,
        config_text=dump_config(cfg), meta=meta,
        check_resume=lambda payload: check_resume_config(cfg, payload, out),
        sync=cfg.distributed.sync, average_every=cfg.distributed.average_every,
        setting_names={"lr": "optim.lr", "divergence_factor": "train.divergence_factor"},
    )
    return trainer.fit(FrameBatches(train_data, cfg.train.batch_size),
                       FrameBatches(test_data, cfg.train.eval_batch_size, shuffle=False), resume=resume,
                       run_dir=run_dir)


def load_data_in_turn(cfg: Config, info: DistInfo) -> tuple[FrameData, FrameData]:
    """Both splits; under torchrun loaded first by the first process of every node (which may
    download and fill the frame cache), then by the others; progress bars on process 0 only."""
    if not info.enabled:
        return load_data(cfg)
    if not info.is_main:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, progress=False))
    first = info.local_rank == 0
    data = together(info, lambda: load_data(cfg) if first else None)
    later = together(info, lambda: None if first else load_data(cfg))
    return data if first else later
