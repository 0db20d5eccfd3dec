"""A finished (or running) run of ``threefactor train``, opened again: ``threefactor eval``
(per-layer accuracy and confusion matrices on its test split or other data), ``threefactor
predict`` (the class of each of some recordings, no labels needed) and ``threefactor plot``
(its plots redrawn).

The checkpoint fixes the classes and the sensor: data given by ``--set data.*`` overrides is
read with the run's own class list and checked against its sensor, so labels keep their meaning.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import Config, ConfigError, override_config
from ..data.datasets.files import EventFiles
from ..data.splits import FrameData, SplitLayout, frame_transform, stack_frames
from ..errors import RunError
from ..report.plots import PLOTS_DIR, draw_run, read_metrics
from ..rules.common import predict_sequence, resolve_loss
from .checkpoint import load_checkpoint
from .from_config import load_split, resolve_device


def run_layout(payload: dict) -> SplitLayout | None:
    """The classes and sensor of a run's training split, as its checkpoint recorded them."""
    sensor = payload.get("sensor_size")
    if sensor is None:
        return None
    return SplitLayout(tuple(payload["classes"]), tuple(int(v) for v in sensor), "the run's checkpoint")


def run_test_split(run: str | Path, cfg: Config, payload: dict) -> FrameData:
    """The test split ``cfg`` describes, read with the run's classes and checked against its
    input shape."""
    data = load_split(cfg, "test", run_layout(payload))
    classes = tuple(payload["classes"])
    if tuple(data.classes) != classes:
        raise RunError(f"the data has the classes {list(data.classes)[:12]}, the run {list(classes)[:12]}")
    if list(data.input_shape) != list(payload["input_shape"]):
        raise RunError(f"the data's frames have shape {list(data.input_shape)}, but {run} was trained "
                       f"on {list(payload['input_shape'])}")
    return data


@dataclass
class RunEvaluation:
    """Per layer: accuracy, mean local loss and the confusion matrix (true x voted class)."""

    accuracy: list[float]
    loss: list[float]
    confusion: np.ndarray  # (L, C, C) counts: row = true class, column = the class the layer voted
    classes: tuple[str, ...]
    samples: int


def evaluate_run(run: str | Path, overrides: list[str] = (), device: str = "auto",
                 batch_size: int | None = None) -> RunEvaluation:
    """The network of ``run`` (a run directory or checkpoint) on its test split; ``overrides``
    (``data.root=...``, ``data.n_test=...``) point it at other data of the same classes."""
    network, cfg, payload = load_checkpoint(run)
    try:
        cfg = override_config(cfg, list(overrides))
    except ConfigError as err:
        raise RunError(str(err)) from None
    dev = resolve_device(device)
    classes = tuple(payload["classes"])
    data = run_test_split(run, cfg, payload)
    network.to(dev).eval()
    cost = resolve_loss(cfg.rule.loss)
    n_layers, n_classes = len(network.layers), len(classes)
    confusion = torch.zeros(n_layers, n_classes, n_classes, dtype=torch.int64)
    loss = torch.zeros(n_layers, dtype=torch.float64)
    size = batch_size or cfg.train.eval_batch_size
    n = len(data.labels)
    for start in range(0, n, size):
        idx = torch.arange(start, min(start + size, n))
        x = data.frames[idx].to(dev, torch.float32)
        y = data.labels[idx].to(dev)
        res = predict_sequence(network, x, y, cfg.rule.burn_in, cost, cfg.train.precision)
        voted = res.votes.argmax(2).cpu()  # (L, B)
        for layer in range(n_layers):
            confusion[layer].index_put_((y.cpu(), voted[layer]), torch.ones(len(idx), dtype=torch.int64),
                                        accumulate=True)
        loss += res.loss.double().cpu() * len(idx)
    correct = confusion.diagonal(dim1=1, dim2=2).sum(1)
    return RunEvaluation((correct.double() / max(n, 1)).tolist(), (loss / max(n, 1)).tolist(),
                         confusion.numpy(), classes, n)


def plot_run(run_dir: str | Path) -> list[Path]:
    """Redraw the plots of a finished or running run from its checkpoint and metrics.jsonl."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: not a run directory")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RunError("plotting needs matplotlib (pip install matplotlib)") from None
    out = run_dir / PLOTS_DIR
    try:  # before the slow part: a directory we cannot write fails now, in one sentence
        out.mkdir(exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as err:
        raise RunError(f"cannot write the plots into {out}: {err.strerror}") from None
    network, cfg, payload = load_checkpoint(run_dir)
    network.eval()
    try:
        rows = read_metrics(run_dir / "metrics.jsonl")
    except (OSError, ValueError) as err:
        raise RunError(f"cannot read the metrics of {run_dir}: {getattr(err, 'strerror', None) or err}") from None
    try:
        test = run_test_split(run_dir, cfg, payload)
    except RunError as err:
        raise RunError(f"{run_dir}: the data its config makes no longer fits the checkpoint ({err})") from None
    try:
        return draw_run(run_dir, network, test.frames[0], int(test.labels[0]), test.classes, rows,
                        burn_in=cfg.rule.burn_in, dt_ms=cfg.data.dt_us / 1000.0)
    except OSError as err:
        raise RunError(f"cannot write the plots into {out}: {err.strerror or err}") from None


@dataclass
class Prediction:
    """The classes the layers voted for one recording, with the share of the voting steps the
    winning class got (per layer, 1 = every step voted for it)."""

    path: str
    classes: list[str]
    vote_share: list[float]


def predict_files(run: str | Path, files: list[str | Path], device: str = "auto",
                  batch_size: int | None = None, progress: bool = False) -> list[Prediction]:
    """The network of ``run`` on the event files ``files`` (any format ``read_events`` reads),
    framed exactly as the run framed its test split (the run's sensor, window, downsampling,
    crop and bins). A file that cannot be read, or whose events lie off the run's sensor, is
    refused naming it (``data.outside_sensor: drop`` in the run's config drops such events)."""
    network, cfg, payload = load_checkpoint(run)
    sensor = payload.get("sensor_size")
    if sensor is None:
        raise RunError(f"{run}: its checkpoint does not record the sensor its data came from, so "
                       "recordings cannot be framed as its own were")
    if not files:
        raise RunError("predict needs at least one event file")
    for f in files:
        if not Path(f).is_file():
            raise RunError(f"{f}: no such file")
    d = cfg.data
    files_ds = EventFiles(files, tuple(sensor), outside_sensor=d.outside_sensor)
    files_ds.transform = frame_transform(d, "test", files_ds.sensor_size, d.test_timesteps or d.timesteps)
    try:
        data = stack_frames(files_ds, np.arange(len(files)), tuple(payload["classes"]), "recordings", progress)
    except (OSError, ValueError) as err:
        raise RunError(str(err)) from None
    if list(data.input_shape) != list(payload["input_shape"]):
        raise RunError(f"the recordings make frames of shape {list(data.input_shape)}, but {run} was "
                       f"trained on {list(payload['input_shape'])}")
    dev = resolve_device(device)
    network.to(dev).eval()
    classes = list(payload["classes"])
    size = batch_size or cfg.train.eval_batch_size
    out: list[Prediction] = []
    for start in range(0, len(files), size):
        x = data.frames[start:start + size].to(dev, torch.float32)
        votes = predict_sequence(network, x, None, cfg.rule.burn_in,
                                 precision=cfg.train.precision).votes.cpu()  # (L, B, C)
        winner = votes.argmax(2)
        share = votes.max(2).values / votes.sum(2).clamp_min(1)
        for b in range(x.shape[0]):
            out.append(Prediction(str(files[start + b]), [classes[int(c)] for c in winner[:, b]],
                                  share[:, b].tolist()))
    return out
