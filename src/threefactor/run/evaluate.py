"""``threefactor eval``: a run's network on its test split (or other data), per layer, with the
confusion matrix of every layer.

The checkpoint fixes the classes and the sensor: data given by ``--set data.*`` overrides is
read with the run's own class list and checked against its sensor, so labels keep their meaning.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import write_atomic
from ..config import ConfigError, override_config
from ..data.splits import SplitLayout
from ..rules.common import predict_sequence, resolve_loss
from ..errors import RunError
from .checkpoint import load_checkpoint
from .from_config import load_split, resolve_device


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
    sensor = payload.get("sensor_size")
    layout = SplitLayout(classes, tuple(int(v) for v in sensor), "the run's checkpoint") if sensor else None
    data = load_split(cfg, "test", layout)
    if tuple(data.classes) != classes:
        raise RunError(f"the data has the classes {list(data.classes)[:12]}, the run {list(classes)[:12]}")
    if list(data.input_shape) != list(payload["input_shape"]):
        raise RunError(f"the data's frames have shape {list(data.input_shape)}, but {run} was trained "
                       f"on {list(payload['input_shape'])}")
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
        res = predict_sequence(network, x, y, cfg.rule.burn_in, cost)
        voted = res.votes.argmax(2).cpu()  # (L, B)
        for layer in range(n_layers):
            confusion[layer].index_put_((y.cpu(), voted[layer]), torch.ones(len(idx), dtype=torch.int64),
                                        accumulate=True)
        loss += res.loss.double().cpu() * len(idx)
    correct = confusion.diagonal(dim1=1, dim2=2).sum(1)
    return RunEvaluation((correct.double() / max(n, 1)).tolist(), (loss / max(n, 1)).tolist(),
                         confusion.numpy(), classes, n)


def plot_confusion(result: RunEvaluation, path: str | Path) -> Path:
    """One panel per layer: the confusion matrix as fractions of each true class."""
    from matplotlib.figure import Figure

    n_layers, n_classes = result.confusion.shape[:2]
    fig = Figure(figsize=(3.6 * n_layers, 3.4), layout="constrained")
    axes = fig.subplots(1, n_layers, squeeze=False)[0]
    per_class = result.confusion.sum(2, keepdims=True).clip(min=1)
    for layer, ax in enumerate(axes):
        ax.imshow(result.confusion[layer] / per_class[layer], vmin=0, vmax=1, cmap="Blues")
        ax.set_title(f"layer {layer + 1}: {100 * result.accuracy[layer]:.1f} %")
        ticks = range(n_classes)
        labels = [str(c)[:8] for c in result.classes] if n_classes <= 20 else None
        if labels:
            ax.set_xticks(ticks, labels, rotation=90, fontsize=7)
            ax.set_yticks(ticks, labels, fontsize=7)
        ax.set_xlabel("voted class")
        ax.set_ylabel("true class")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, buf.getvalue())
    except OSError as err:
        raise RunError(f"cannot write {path}: {err.strerror or err}") from None
    return path
