"""The trainer: epochs of online learning, per-layer evaluation, a run directory of results.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one row per
epoch, split and layer), ``checkpoint.pt`` (everything needed to continue the run exactly),
``summary.json`` at the end, ``tensorboard/`` event files and ``plots/`` PNGs.

A run holds an exclusive lock on its directory for its whole life (``threefactor.run.directory``): a
second run into it is refused before it writes anything. A new run that fails before its first
checkpoint (missing data, no CUDA, a network that does not fit the data) removes what it wrote.

Checkpoints are written atomically (uniquely named temporary file, then rename) at the end of every epoch and
every ``train.checkpoint_every`` batches. Each holds the weights, the optimiser and LR-schedule
state, every random-number generator the run uses, the position in the data order (epoch,
batch and the epoch's permutation), the running per-epoch sums and how many bytes of
``metrics.jsonl`` it accounts for, so that ``train(cfg, run_dir, resume=True)`` continues a
killed run and ends with the same weights, bit for bit (on the same device and software), and
the same metrics rows. The sha256 of the file's bytes is sealed into its last bytes and checked
before loading, which never unpickles anything but tensors and plain data
(``torch.load(weights_only=True)``): an altered or truncated checkpoint is refused.

Divergence stops a run before its weights are checkpointed: a loss or weight that is NaN or
Inf, or a layer's loss or weight norm beyond ``train.divergence_factor`` times its running value
(see ``DivergenceGuard``); the last good checkpoint is kept.

Under ``torchrun`` with more than one process (see ``threefactor.run.collective``), every process
takes a contiguous share of each batch (``train.batch_size`` is the batch of all processes
together), the models are kept in step by ``distributed.sync``, metrics are sums over all
processes, and process 0 alone writes the run directory and logs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import random
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from . import collective as distributed
from .allocator import retain_freed_memory
from ..config import Config, config_from_dict, dump_config, to_dict
from ..data.splits import FrameData, SplitLayout
from ..data.splits import load_split as _load_split
from ..data.splits import load_splits as _load_splits
from .collective import DistInfo
from ..model.network import DecolleNetwork, build_network, lsuv_init
from .optim import Adamax
from ..rules.common import SequenceResult, predict_sequence, resolve_loss
from ..rules import make_rule
from ..atomic import write_atomic
from .checkpoint import checkpoint_bytes, parse_checkpoint, load_checkpoint, read_checkpoint, save_checkpoint
from .directory import CHECKPOINT_NAME, METRICS_NAME, RunDirectory, RunDirectoryError
from ..errors import RunError


# Settings that may differ between a run's checkpoint and its config.yaml on --resume: they
# change how long the run goes on or what it writes, not what it computes.
RESUMABLE_CHANGES = (
    "device", "train.epochs", "train.progress", "train.checkpoint_every", "train.eval_every",
    "train.tensorboard", "train.plots", "train.eval_batch_size", "train.divergence_factor",
)

# Test hook: "K:PATH" makes the trainer create PATH and sleep just before it would checkpoint
# training batch K (counted over the whole run), so a test can kill it at a known point.
_STALL_ENV = "THREEFACTOR_TEST_STALL"


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
        return _load_split(cfg.data, split, cfg.train.progress, layout)
    except (OSError, ValueError, MemoryError) as err:  # missing or unreadable files, bad sizes
        raise RunError(str(err)) from None


def load_data(cfg: Config) -> tuple[FrameData, FrameData]:
    """Both splits, with the training split's classes and sensor, checked against each other."""
    try:
        train_data, test_data = _load_splits(cfg.data, cfg.train.progress)
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


def accuracy(votes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-layer accuracy (L,) of the majority class over time from votes (L, B, C)."""
    return (votes.argmax(2) == labels[None]).float().mean(1)


def _batches(n: int, size: int, gen: torch.Generator | None):
    order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    return [order[i:i + size] for i in range(0, n, size)]


class SpikeMeter:
    """Mean firing rate of every layer, collected by forward hooks (the rule's loop is untouched),
    and whether any membrane potential went non-finite (a diverged run whose losses can still be
    finite: the readouts see binary spikes)."""

    def __init__(self, network: DecolleNetwork) -> None:
        n = len(network.layers)
        device = next(network.parameters()).device
        self.sums = torch.zeros(n, dtype=torch.float64, device=device)
        self.membrane_sums = torch.zeros(n, dtype=torch.float64, device=device)
        self.counts = [0] * n
        self.handles = [
            layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(network.layers)
        ]

    def _hook(self, i: int):
        def hook(module, inputs, output) -> None:
            s = output[0].s
            self.sums[i] += s.detach().sum()
            self.membrane_sums[i] += output[0].u.detach().sum()  # NaN or Inf once any U is
            self.counts[i] += s.numel()
        return hook

    def take(self) -> list[float]:
        """Rates since the last call (spikes per neuron per step), then reset."""
        rates = [s / c if c else 0.0 for s, c in zip(self.sums.tolist(), self.counts)]
        self.sums.zero_()
        self.counts = [0] * len(self.counts)
        return rates

    def take_nonfinite(self) -> list[int]:
        """Layers (1-based) whose membrane potential went NaN or Inf since the last call, then reset."""
        bad = [i + 1 for i, v in enumerate(self.membrane_sums.tolist()) if not np.isfinite(v)]
        self.membrane_sums.zero_()
        return bad

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def evaluate(
    network: DecolleNetwork, data: FrameData, cfg: Config, device: torch.device,
    info: DistInfo = distributed.SINGLE,
) -> tuple[list[float], list[float]]:
    """Per-layer test accuracy and mean local loss over ``data``.

    Under torchrun (``info``) every process evaluates its contiguous share of ``data`` and the
    sums are added over the processes: every process returns the figures of the whole split.
    """
    network_was_training = network.training
    network.eval()
    n_layers = len(network.layers)
    correct = torch.zeros(n_layers)
    loss = torch.zeros(n_layers)
    lo, hi = distributed.shard(len(data.labels), info.rank, info.world_size)
    cost = resolve_loss(cfg.rule.loss)
    for idx in _batches(hi - lo, cfg.train.eval_batch_size, None):
        if lo:
            idx = idx + lo
        x = data.frames[idx].to(device, torch.float32)
        y = data.labels[idx].to(device)
        res = predict_sequence(network, x, y, cfg.rule.burn_in, cost)
        correct += (res.votes.argmax(2) == y[None]).sum(1).cpu()
        loss += res.loss.cpu() * len(idx)
    if info.enabled:
        sums = distributed.all_reduce_sum(torch.cat([correct, loss]).double())
        correct, loss = sums[:n_layers].float(), sums[n_layers:].float()
    n = len(data.labels)
    network.train(network_was_training)
    return (correct / n).tolist(), (loss / n).tolist()


# --- the state of a run in progress -------------------------------------------------------


def _rng_states(device: torch.device) -> dict:
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
        "numpy": {"name": str(np_state[0]), "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss},
    }


def _set_rng_states(states: dict, device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and device.type == "cuda":
        if len(states["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states["cuda"])
    n = states["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


@dataclass
class _Progress:
    """Where the run is: everything but the weights and the optimiser that a resume needs."""

    n_layers: int
    epoch_done: int = 0  # completed epochs
    batch: int = 0  # batches completed in the epoch in progress
    perm: torch.Tensor | None = None  # the data order of the epoch in progress
    batches_total: int = 0
    samples: int = 0
    seen: int = 0  # samples of the epoch in progress
    correct: torch.Tensor = field(default=None)  # type: ignore[assignment]
    loss_sum: torch.Tensor = field(default=None)  # type: ignore[assignment]
    rate_sum: torch.Tensor = field(default=None)  # type: ignore[assignment]
    metrics_bytes: int = 0
    elapsed_s: float = 0.0
    test_accuracy: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    resumes: int = 0

    def __post_init__(self) -> None:
        if self.correct is None:
            self.reset_epoch()
        if not self.test_accuracy:
            self.test_accuracy = [0.0] * self.n_layers
            self.test_loss = [0.0] * self.n_layers

    def reset_epoch(self) -> None:
        self.correct = torch.zeros(self.n_layers)
        self.loss_sum = torch.zeros(self.n_layers)
        self.rate_sum = torch.zeros(self.n_layers, dtype=torch.float64)
        self.seen = 0

    def to_payload(self, gen: torch.Generator, device: torch.device) -> dict:
        return {
            "epoch_done": self.epoch_done, "batch": self.batch, "permutation": self.perm,
            "batches_total": self.batches_total, "samples": self.samples, "seen": self.seen,
            "correct": self.correct, "loss_sum": self.loss_sum, "rate_sum": self.rate_sum,
            "metrics_bytes": self.metrics_bytes, "elapsed_s": self.elapsed_s,
            "test_accuracy": list(self.test_accuracy), "test_loss": list(self.test_loss),
            "resumes": self.resumes,
            "data_order_generator": gen.get_state(), "rng": _rng_states(device),
        }

    @classmethod
    def from_payload(cls, n_layers: int, p: dict) -> "_Progress":
        return cls(
            n_layers, p["epoch_done"], p["batch"], p["permutation"], p["batches_total"],
            p["samples"], p["seen"], p["correct"], p["loss_sum"], p["rate_sum"],
            p["metrics_bytes"], p["elapsed_s"], list(p["test_accuracy"]), list(p["test_loss"]),
            p["resumes"],
        )


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flat(v, key))
        else:
            out[key] = v
    return out


def _check_resume_config(cfg: Config, payload: dict, where: Path) -> None:
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


def _stall_hook(batches_total: int) -> None:
    spec = os.environ.get(_STALL_ENV)
    if not spec:
        return
    at, _, marker = spec.partition(":")
    if int(at) == batches_total:
        if marker:
            Path(marker).write_text(f"{batches_total}\n")
        time.sleep(600)


class DivergenceGuard:
    """Divergence that is still finite: a layer's loss or weight norm far above its running value.

    For every layer the guard keeps the running value of its batch loss and of its weight norm
    (the 2-norm of all its parameters): their mean over the good batches so far (the weight norm
    counting the initial weights as one), exponential over the last ``RUNNING_BATCHES`` once
    there are more. A batch has diverged when a value exceeds ``factor`` times the larger of
    its running value and ``FLOOR`` (so that a loss near zero may still vary): with the default
    ``train.divergence_factor`` of 1000, three orders of magnitude, which learning does not do
    in a few batches and a too-large learning rate does in one. ``factor`` 0 turns it off.
    """

    RUNNING_BATCHES = 50
    FLOOR = 1.0

    def __init__(self, factor: float, network: DecolleNetwork, state: dict | None = None) -> None:
        self.factor = factor
        if isinstance(state, dict) and state.get("norm") is not None:
            self.loss, self.norm, self.count = state.get("loss"), list(state["norm"]), int(state["count"])
        else:
            self.loss, self.norm, self.count = None, self.norms(network), 0

    @staticmethod
    def norms(network: DecolleNetwork) -> list[float]:
        """The 2-norm of each layer's parameters (in float64: float32 squares overflow early)."""
        with torch.no_grad():
            sums = []
            for layer in network.layers:
                squares = [p.detach().double().pow(2).sum() for p in layer.parameters()]
                sums.append(torch.stack(squares).sum() if squares else torch.zeros((), dtype=torch.float64))
            return torch.stack(sums).sqrt().tolist()

    def _limit(self, running: float) -> float:
        return self.factor * max(running, self.FLOOR)

    def weight_problem(self, norms: list[float]) -> str | None:
        return self._problem("weight norm", norms, self.norm)

    def loss_problem(self, losses: list[float]) -> str | None:
        return self._problem("loss", losses, self.loss)

    def _problem(self, what: str, values: list[float], running: list[float] | None) -> str | None:
        """The first layer whose ``what`` is beyond ``factor`` times its running value, in words."""
        if not self.factor or running is None:
            return None
        for i, (value, run) in enumerate(zip(values, running)):
            if value > self._limit(run):
                return (f"the {what} of layer {i + 1} grew to {value:.3g}, over {self.factor:g} "
                        f"times its running value {run:.3g}")
        return None

    def accept(self, losses: list[float], norms: list[float]) -> None:
        """A good batch: its values join the running ones."""
        self.count += 1
        rate = 1.0 / min(self.count + 1, self.RUNNING_BATCHES)
        self.norm = [r + (v - r) * rate for r, v in zip(self.norm, norms)]
        if self.loss is None:
            self.loss = list(losses)
        else:
            rate = 1.0 / min(self.count, self.RUNNING_BATCHES)
            self.loss = [r + (v - r) * rate for r, v in zip(self.loss, losses)]

    def state(self) -> dict:
        return {"loss": self.loss, "norm": self.norm, "count": self.count}


def _check_finite(losses: torch.Tensor, network: DecolleNetwork) -> str | None:
    """What went non-finite, or None."""
    problems = []
    bad = [i + 1 for i, v in enumerate(losses.tolist()) if not np.isfinite(v)]
    if bad:
        problems.append("the loss of layer " + ", ".join(map(str, bad))
                        + f" became {', '.join(str(losses[i - 1].item()) for i in bad)}")
    for i, layer in enumerate(network.layers):
        for name, p in layer.named_parameters():
            if not torch.isfinite(p).all():
                problems.append(f"layer {i + 1} {name.replace('synapse.', '')} holds NaN or Inf")
    return "; ".join(problems) or None


# --- training -----------------------------------------------------------------------------


def train(
    cfg: Config,
    out_dir: str | Path,
    log: Callable[[str], None] = print,
    resume: bool = False,
) -> dict:
    """Train ``cfg`` and write the run directory ``out_dir``; returns the summary.

    With ``resume`` the run in ``out_dir`` continues from its checkpoint (``cfg`` should be the
    run's own config.yaml; see ``RESUMABLE_CHANGES`` for what may differ). Started by torchrun
    with more than one process, the processes train together (see ``threefactor.run.collective``);
    process 0 writes ``out_dir`` and calls ``log``, the others write nothing. The process keeps
    the memory it frees (``allocator.retain_freed_memory``), so the buffers every step
    reallocates are not page-faulted in again.
    """
    retain_freed_memory()
    out = Path(out_dir)
    try:
        info = distributed.env_info()
        resolve_loss(cfg.rule.loss)  # a user cost that does not import: before anything is written
    except (distributed.DistributedError, ValueError) as err:
        raise RunError(str(err)) from None
    if info.enabled:
        return _train_together(cfg, out, log, resume)
    device = resolve_device(cfg.device)  # before the directory is touched: a bad device writes nothing
    run_dir = _open_run_dir(cfg, out, resume, log)
    closers: list[Callable[[], None]] = [run_dir.close]
    try:
        payload = None if run_dir.fresh else _resume_payload(cfg, out)
        return _run(cfg, out, device, payload, run_dir, log, closers)
    finally:
        for close in reversed(closers):
            close()


def _open_run_dir(cfg: Config, out: Path, resume: bool, log: Callable[[str], None] | None = None) -> RunDirectory:
    """The run directory, locked for this run and checked (for a new run, created)."""
    try:
        run_dir = RunDirectory.open(out, dump_config(cfg), resume)
    except RunDirectoryError as err:
        raise RunError(str(err)) from None
    if resume and run_dir.fresh and log is not None:
        log(f"{out} has no checkpoint yet (its run stopped before the first one): starting it "
            "from its config.yaml")
    return run_dir


def _resume_payload(cfg: Config, out: Path, data: bytes | None = None) -> dict:
    """The checkpoint of the run in ``out`` (from ``data``, its bytes, when given), checked
    against ``cfg``."""
    ckpt_path = out / CHECKPOINT_NAME
    if data is None:
        payload = read_checkpoint(ckpt_path)
    else:
        payload = parse_checkpoint(ckpt_path, data)
    _check_resume_config(cfg, payload, out)
    if not isinstance(payload.get("progress"), dict):
        raise RunError(f"{ckpt_path}: the checkpoint holds no training progress to resume from")
    return payload


def _build_network(cfg: Config, input_shape: tuple[int, ...], n_classes: int) -> DecolleNetwork:
    try:
        return build_network(cfg.network, tuple(input_shape), n_classes, cfg.seed)
    except ValueError as err:
        raise RunError(f"cannot build the network for inputs of shape {list(input_shape)}: {err}") from None


def _short_list(items) -> str:
    items = list(items or [])
    return repr(items) if len(items) <= 12 else repr(items[:12])[:-1] + ", ...]"


def _silent(message: str) -> None:
    """The log of every process but process 0."""


def _together(info: DistInfo, fn: Callable[[], Any]) -> Any:
    """``fn()`` on this process; under torchrun, a RunError that any process raised is raised on
    every process (the others' copies are marked ``relayed``), so that none waits forever."""
    if not info.enabled:
        return fn()
    try:
        result, error = fn(), None
    except RunError as err:
        result, error = None, err
    messages = distributed.all_gather_object(None if error is None else str(error))
    first = next((m for m in messages if m is not None), None)
    if first is None:
        return result
    if error is not None and str(error) == first:
        raise error
    relayed = RunError(first)
    relayed.relayed = True
    raise relayed


def _everywhere(info: DistInfo, err: RunError) -> RunError:
    """``err``, which every process raises at once: process 0 reports it, the others keep quiet."""
    err.relayed = info.rank > 0
    return err


def _train_together(cfg: Config, out: Path, log, resume: bool) -> dict:
    """``train`` as one of several processes started by torchrun."""
    device = resolve_device(cfg.device)
    try:
        info, device = distributed.init_from_env(device)
    except distributed.DistributedError as err:
        raise RunError(str(err)) from None
    closers: list[Callable[[], None]] = [distributed.teardown]
    try:
        if not info.is_main:
            log = _silent
        # Process 0 alone checks and writes the run directory and reads the checkpoint; the
        # others get the checkpoint's bytes from it (no shared file system is needed for that).
        run_dir = _together(info, lambda: _open_run_dir(cfg, out, resume, log) if info.is_main
                            else RunDirectory.detached())
        closers.append(run_dir.close)
        payload = None
        if not distributed.broadcast_object(run_dir.fresh):
            data = _together(info, lambda: checkpoint_bytes(out / CHECKPOINT_NAME) if info.is_main else None)
            payload = _together(info, lambda: _resume_payload(cfg, out, data) if info.is_main else None)
            data = distributed.broadcast_object(data)
            if not info.is_main:
                payload = parse_checkpoint(out / CHECKPOINT_NAME, data)
            del data
        summary = _run(cfg, out, device, payload, run_dir, log, closers, info)
        distributed.wait_for_all()
        return summary
    finally:
        for close in reversed(closers):
            close()


def _run(cfg: Config, out: Path, device: torch.device, payload: dict | None, run_dir: RunDirectory,
         log, closers: list, info: DistInfo = distributed.SINGLE) -> dict:
    from ..report.tensorboard import open_tensorboard

    ckpt_path = out / CHECKPOINT_NAME
    metrics_file = run_dir.metrics
    torch.manual_seed(cfg.seed)
    t_start = time.perf_counter()
    if info.enabled:
        train_data, test_data = _load_data_in_turn(cfg, info)
    else:
        train_data, test_data = load_data(cfg)
    sensor = ""
    if train_data.sensor_size is not None:
        w, h, p = train_data.sensor_size
        origin = f" ({train_data.sensor_origin})" if train_data.sensor_origin else ""
        sensor = f" from a {w} x {h} x {p} sensor{origin}"
    log(
        f"data: {len(train_data.labels)} train / {len(test_data.labels)} test samples of shape "
        f"{tuple(train_data.frames.shape[1:])}{sensor}, {len(train_data.classes)} classes "
        f"({time.perf_counter() - t_start:.1f} s); device: {device}"
    )
    for note in [*train_data.warnings, *test_data.warnings]:
        log(f"warning: {note}")

    network = _build_network(cfg, train_data.input_shape, len(train_data.classes))
    if payload is not None:
        if list(payload.get("input_shape", [])) != list(train_data.input_shape):
            raise RunError(f"{ckpt_path}: written for input shape {payload.get('input_shape')}, "
                           f"but the data now has {list(train_data.input_shape)}")
        if list(payload.get("classes", [])) != list(train_data.classes):
            raise RunError(f"{ckpt_path}: written for the classes {_short_list(payload.get('classes'))}, "
                           f"but the data now has {_short_list(train_data.classes)}")
        saved_sensor = payload.get("sensor_size")
        if saved_sensor is not None and train_data.sensor_size is not None \
                and list(saved_sensor) != list(train_data.sensor_size):
            raise RunError(f"{ckpt_path}: written for a {' x '.join(map(str, saved_sensor))} sensor, but "
                           f"the data now has {' x '.join(map(str, train_data.sensor_size))}")
        try:
            network.load_state_dict(payload["model"])
        except RuntimeError:
            raise RunError(f"{ckpt_path}: weights do not match the network its config describes") from None
    network.to(device)
    if payload is None and cfg.network.init == "lsuv":
        sample = train_data.frames[: min(64, len(train_data.labels))].to(device, torch.float32)
        stats = lsuv_init(network, sample, cfg.network.init_target_mean, skip_steps=cfg.rule.burn_in)
        log("init: LSUV, membrane (mean, var) per layer: "
            + ", ".join(f"({m:.2f}, {v:.2f})" for m, v in stats))
    if info.enabled:
        distributed.broadcast_module(network)  # every process starts from process 0's model

    optimizer = make_optimizer(cfg, network)
    scheduler = make_scheduler(cfg, optimizer)
    rule = make_rule(cfg, network, optimizer)  # rule.name: decolle | stllr | bptt
    # Keeps the processes' models in step through optimiser hooks (nothing in one process).
    sync = distributed.Synchroniser(optimizer, info, cfg.distributed.sync, cfg.distributed.average_every)
    closers.append(sync.close)
    gen = torch.Generator().manual_seed(cfg.seed)
    n_layers = len(network.layers)
    n_train = len(train_data.labels)

    if payload is None:
        st = _Progress(n_layers)
    else:
        try:
            optimizer.load_state_dict(payload["optimizer"])
            scheduler.load_state_dict(payload["scheduler"])
            st = _Progress.from_payload(n_layers, payload["progress"])
            gen.set_state(payload["progress"]["data_order_generator"])
            _set_rng_states(payload["progress"]["rng"], device)
        except (KeyError, TypeError, ValueError, RuntimeError):
            raise RunError(f"{ckpt_path}: the checkpoint's training state does not fit this run") from None
        if st.perm is not None and len(st.perm) != n_train:
            raise RunError(f"{ckpt_path}: written for {len(st.perm)} training samples, the data has {n_train}")

        def rewind_metrics() -> None:
            metrics_file.seek(0, os.SEEK_END)
            if metrics_file.tell() < st.metrics_bytes:
                raise RunError(f"{out / METRICS_NAME}: shorter than when the checkpoint was written; "
                               "rows are missing, so the run cannot be continued")
            metrics_file.truncate(st.metrics_bytes)  # rows written after the checkpoint come again
            metrics_file.seek(st.metrics_bytes)

        _together(info, rewind_metrics if info.is_main else lambda: None)
        if info.enabled:
            _set_rank_rng(payload["progress"], info, cfg.seed, st.batches_total, device)
        st.resumes += 1
        log(f"resuming {out}: {st.epoch_done} epochs and {st.batch} batches done "
            f"({st.batches_total} batches in all)")
    if payload is None and info.rank > 0:
        torch.manual_seed(distributed.rank_seed(cfg.seed, info.rank))  # its own dropout masks
    elapsed_before = st.elapsed_s

    def now_s() -> float:
        return elapsed_before + time.perf_counter() - t_start

    tb = open_tensorboard(cfg.train.tensorboard and info.is_main, out,
                          st.batches_total + 1 if payload else None, log)
    closers.append(tb.close)
    meter = SpikeMeter(network)
    closers.append(meter.close)
    guard = DivergenceGuard(cfg.train.divergence_factor, network,
                            payload["progress"].get("divergence") if payload is not None else None)

    def record(epoch: int, split: str, accs, losses, rates, stats: dict | None = None) -> None:
        for i, (a, l, r) in enumerate(zip(accs, losses, rates)):
            row = {"epoch": epoch, "split": split, "layer": i + 1, "accuracy": a, "loss": l,
                   "firing_rate": r, "lr": optimizer.param_groups[0]["lr"],
                   "batch": st.batch, "batches": st.batches_total, "samples": st.samples,
                   "time_s": now_s()}
            # Rule-specific per-layer figures, e.g. the error-triggered update fraction.
            row.update({k: v[i] for k, v in (stats or {}).items() if isinstance(v, list) and len(v) > i})
            metrics_file.write((json.dumps(row) + "\n").encode())
        metrics_file.flush()

    def test_eval(epoch: int) -> None:
        sync.consensus()
        meter.take()
        st.test_accuracy, st.test_loss = evaluate(network, test_data, cfg, device, info)
        rates = meter.take()
        if info.enabled:
            lo, hi = distributed.shard(len(test_data.labels), info.rank, info.world_size)
            rates = _global_mean(rates, hi - lo)
        record(epoch, "test", st.test_accuracy, st.test_loss, rates)
        tb.epoch_metrics(st.batches_total, "test", st.test_accuracy, st.test_loss, rates)

    last_checkpoint: dict = {}

    def checkpoint() -> None:
        sync.consensus()  # periodic mode: the checkpoint holds the processes' mean model
        rank_rng = distributed.all_gather_object(_rng_states(device)) if info.enabled else None
        last_checkpoint.update(epoch_done=st.epoch_done, batch=st.batch)
        if not info.is_main:
            return
        st.metrics_bytes = metrics_file.tell()
        st.elapsed_s = now_s()
        progress = st.to_payload(gen, device)
        progress["divergence"] = guard.state()
        if rank_rng is not None:
            progress["rank_rng"] = rank_rng
        save_checkpoint(ckpt_path, network, optimizer, cfg, st.epoch_done, train_data,
                        scheduler=scheduler, progress=progress)
        tb.flush()

    def describe_checkpoint() -> str:
        try:
            p = read_checkpoint(ckpt_path)["progress"] if info.is_main else dict(last_checkpoint)
        except (RunError, KeyError, TypeError):
            return "none readable"
        if not p:
            return "none readable"
        if p["batch"]:
            return f"from epoch {p['epoch_done'] + 1}, batch {p['batch']}"
        return f"from the end of epoch {p['epoch_done']}" if p["epoch_done"] else "from before the first batch"

    if payload is None:
        checkpoint()  # the initial state: a resume point and a last good checkpoint from the start
    run_dir.started()  # from here on the run's files are kept, whatever happens

    epochs = cfg.train.epochs
    if payload is not None and st.epoch_done >= epochs and st.perm is None:
        log(f"the run in {out} is already complete ({st.epoch_done} epochs)")
    while st.epoch_done < epochs:
        epoch = st.epoch_done + 1
        if st.perm is None:
            st.perm = torch.randperm(n_train, generator=gen)
            st.batch = 0
            st.reset_epoch()
        batches = [st.perm[i:i + cfg.train.batch_size] for i in range(0, n_train, cfg.train.batch_size)]
        network.train()
        bar = tqdm(total=len(batches), initial=st.batch, desc=f"epoch {epoch}/{epochs}", unit="batch",
                   disable=not (cfg.train.progress and info.is_main), leave=False, dynamic_ncols=True)
        for b in range(st.batch, len(batches)):
            idx = batches[b]
            local = idx
            if info.enabled:
                # This process's contiguous share of the global batch; a process left without a
                # sample runs the batch's first one with weight 0, so that all take the same steps.
                lo, hi = distributed.shard(len(idx), info.rank, info.world_size)
                local = idx[lo:hi] if hi > lo else idx[:1]
                sync.weight = hi - lo
            x = train_data.frames[local].to(device, torch.float32, non_blocking=True)
            y = train_data.labels[local].to(device)
            meter.take()
            steps_before = sync.steps
            res: SequenceResult = rule.train_sequence(x, y)
            rates = meter.take()
            bad_u = meter.take_nonfinite()
            membranes = (f"the membrane potential of layer {', '.join(map(str, bad_u))} became NaN or Inf"
                         if bad_u else None)
            norms = guard.norms(network)
            blown_up = guard.weight_problem(norms)
            if info.enabled:
                if sync.steps == steps_before:  # the processes would drift apart unnoticed
                    raise _everywhere(info, RunError(
                        f"rule {cfg.rule.name!r} changed the weights without calling "
                        "optimizer.step(), whose hooks keep the processes in step, so it cannot "
                        "train on several processes"
                    ))
                batch = _global_batch(res, y, rates, int(sync.weight), network,
                                      membranes is not None or blown_up is not None)
            else:
                batch = _Batch((res.votes.argmax(2) == y[None]).sum(1).cpu(), res.loss.cpu() * len(idx),
                               torch.tensor(rates, dtype=torch.float64) * len(idx), res.loss)
            losses = batch.loss.tolist()
            problem = _check_finite(batch.loss, network) or membranes
            finite_growth = None if problem else (blown_up or guard.loss_problem(losses))
            problem = problem or finite_growth or batch.elsewhere
            if problem is not None:
                bar.close()
                hint = (f", or raise train.divergence_factor (now {cfg.train.divergence_factor:g}) if "
                        "such growth is intended" if finite_growth else "")
                raise _everywhere(info, RunError(
                    f"the run diverged in epoch {epoch}, batch {b + 1}: {problem}; it was stopped and "
                    f"the last good checkpoint ({describe_checkpoint()}) is kept in {ckpt_path}; "
                    f"lower optim.lr (now {cfg.optim.lr:g}){hint}"
                ))
            guard.accept(losses, norms)
            st.correct += batch.correct
            st.loss_sum += batch.loss_sum
            st.rate_sum += batch.rate_sum
            st.seen += len(idx)
            st.batch = b + 1
            st.batches_total += 1
            st.samples += len(idx)
            bar.update(1)
            bar.set_postfix(acc=f"{(st.correct[-1] / st.seen).item():.3f}", loss=f"{batch.loss[-1].item():.4f}")
            if info.enabled:
                rates = (batch.rate_sum / len(idx)).tolist()
            tb.batch_metrics(st.batches_total, batch.loss.tolist(), rates, optimizer.param_groups[0]["lr"])

            end_of_epoch = st.batch == len(batches)
            if cfg.train.eval_every and st.batches_total % cfg.train.eval_every == 0 and not end_of_epoch:
                test_eval(epoch)
            if end_of_epoch:
                scheduler.step()
                train_acc = (st.correct / st.seen).tolist()
                train_loss = (st.loss_sum / st.seen).tolist()
                train_rates = (st.rate_sum / st.seen).tolist()
                record(epoch, "train", train_acc, train_loss, train_rates, _mean_stats(res.stats, info))
                tb.epoch_metrics(st.batches_total, "train", train_acc, train_loss, train_rates)
                test_eval(epoch)
                tb.weights(st.batches_total, network)
                st.epoch_done, st.perm, st.batch = epoch, None, 0
                st.reset_epoch()
                log(
                    f"epoch {epoch}: train acc " + " ".join(f"L{i + 1} {a:.3f}" for i, a in enumerate(train_acc))
                    + " | test acc " + " ".join(f"L{i + 1} {a:.3f}" for i, a in enumerate(st.test_accuracy))
                    + f" | {now_s():.0f} s"
                )
            _stall_hook(st.batches_total)
            if end_of_epoch or (cfg.train.checkpoint_every and st.batches_total % cfg.train.checkpoint_every == 0):
                checkpoint()
        bar.close()
    if epochs == 0 and payload is None:
        test_eval(0)
        checkpoint()

    sync.consensus()
    summary = {
        "test_accuracy": {f"layer{i + 1}": a for i, a in enumerate(st.test_accuracy)},
        "test_loss": {f"layer{i + 1}": l for i, l in enumerate(st.test_loss)},
        "last_layer_test_accuracy": st.test_accuracy[-1],
        "epochs": cfg.train.epochs,
        "batches": st.batches_total,
        "samples_seen": st.samples,
        "resumes": st.resumes,
        "wall_time_s": now_s(),
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if info.enabled:
        summary["distributed"] = sync.stats()  # process 0's view of the synchronisation
    if not info.is_main:
        return summary
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    metrics_file.flush()
    if cfg.train.plots:
        _draw_plots(out, network, cfg, test_data, log)
    return summary


# --- several processes (torchrun) --------------------------------------------------------------


class _Batch(NamedTuple):
    """One training batch's figures, summed over its samples (over all processes)."""

    correct: torch.Tensor  # (L,) correctly voted samples
    loss_sum: torch.Tensor  # (L,) loss times samples
    rate_sum: torch.Tensor  # (L,) float64, firing rate times samples
    loss: torch.Tensor  # (L,) mean loss of the batch
    elsewhere: str | None = None  # a problem another process found


def _global_batch(res: SequenceResult, y: torch.Tensor, rates: list[float], weight: int,
                  network: DecolleNetwork, bad_membranes: bool = False) -> _Batch:
    """The batch's figures summed over the processes (one all-reduce): ``weight`` is this
    process's number of samples (0: it ran a stand-in sample that must not count)."""
    n_layers = len(network.layers)
    # bad_membranes: this process found a problem of its own (NaN or blown-up values)
    bad_weights = bad_membranes or not all(bool(torch.isfinite(p).all()) for p in network.parameters())
    local = torch.zeros(3 * n_layers + 2, dtype=torch.float64)
    if weight:
        local[:n_layers] = (res.votes.argmax(2) == y[None]).sum(1).cpu().double()
        local[n_layers:2 * n_layers] = res.loss.detach().cpu().double() * weight
        local[2 * n_layers:3 * n_layers] = torch.tensor(rates, dtype=torch.float64) * weight
    local[-2] = weight
    local[-1] = float(bad_weights)
    total = distributed.all_reduce_sum(local)
    n = total[-2]
    loss_sum = total[n_layers:2 * n_layers].float()
    elsewhere = None
    if total[-1] > 0 and not bad_weights:
        elsewhere = ("the weights or membrane potentials of another process hold NaN or Inf or "
                     "grew by orders of magnitude")
    return _Batch(total[:n_layers].float(), loss_sum, total[2 * n_layers:3 * n_layers],
                  (total[n_layers:2 * n_layers] / n).float(), elsewhere)


def _global_mean(values: list[float], weight: int) -> list[float]:
    """The mean over all processes' samples of per-process means ``values`` of ``weight`` samples."""
    t = torch.tensor([*values, 0.0], dtype=torch.float64) * weight
    t[-1] = weight
    total = distributed.all_reduce_sum(t)
    return (total[:-1] / total[-1].clamp_min(1)).tolist()


def _mean_stats(stats: dict | None, info: DistInfo) -> dict | None:
    """A rule's per-layer figures (lists of numbers), averaged over the processes."""
    if not info.enabled or not stats:
        return stats
    keys = sorted(k for k, v in stats.items()
                  if isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v))
    if not keys:
        return stats
    flat = torch.tensor([float(x) for k in keys for x in stats[k]], dtype=torch.float64)
    mean = (distributed.all_reduce_sum(flat) / info.world_size).tolist()
    out, i = dict(stats), 0
    for k in keys:
        out[k], i = mean[i:i + len(stats[k])], i + len(stats[k])
    return out


def _load_data_in_turn(cfg: Config, info: DistInfo) -> tuple[FrameData, FrameData]:
    """Both splits, loaded first by the first process of every node (which may download and
    fill the frame cache), then by the others; progress bars on process 0 only."""
    if not info.is_main:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, progress=False))
    first = info.local_rank == 0
    data = _together(info, lambda: load_data(cfg) if first else None)
    later = _together(info, lambda: None if first else load_data(cfg))
    return data if first else later


def _set_rank_rng(progress: dict, info: DistInfo, seed: int, batches_total: int,
                  device: torch.device) -> None:
    """On resume: every process's own random state back when the checkpoint was written by as
    many processes; otherwise process 0 gets the checkpoint's and the others fresh streams."""
    states = progress.get("rank_rng")
    if isinstance(states, list) and len(states) == info.world_size:
        _set_rng_states(states[info.rank], device)
    elif info.rank > 0:
        torch.manual_seed(distributed.rank_seed(seed, info.rank, batches_total))


def _draw_plots(out: Path, network: DecolleNetwork, cfg: Config, test_data: FrameData, log) -> None:
    try:
        from ..report.plots import draw_run
    except ImportError:
        log("plots: skipped, matplotlib is not installed (pip install matplotlib)")
        return
    try:
        paths = draw_run(out, network, cfg, test_data.frames[0], int(test_data.labels[0]),
                         test_data.classes)
    except Exception as err:  # a drawing problem must not cost a finished run its results
        log(f"plots: could not draw them ({type(err).__name__}: {err}); retry with threefactor plot {out}")
        return
    log(f"plots: {', '.join(p.name for p in paths)} in {out / 'plots'}")
