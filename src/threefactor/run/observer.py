"""What a run tells the code that watches it: the ``Observer`` base class and the figures it
is given. ``threefactor.report`` has the TensorBoard and plots observers; write your own by
overriding the methods you need."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

from torch import nn


@dataclass(frozen=True)
class RunStart:
    """The run as it starts (or resumes): ``batches_done`` training batches are behind it."""

    out_dir: Path
    network: nn.Module
    batches_done: int
    resumed: bool
    log: Callable[[str], None]


class BatchMetrics(NamedTuple):
    """One training batch, over all processes; lists have one entry per layer."""

    epoch: int
    batch: int  # 1-based, within the epoch
    batches_done: int  # over the whole run, this one included
    loss: list[float]
    firing_rate: list[float]
    lr: float


class SplitMetrics(NamedTuple):
    """Per-layer figures of a split: ``train`` (the epoch's running figures) or ``test``."""

    epoch: int
    batches_done: int
    split: str
    accuracy: list[float]
    loss: list[float]
    firing_rate: list[float]


class Observer:
    """Watches a run; override what you need (every method does nothing here). Called on
    process 0 only. ``threefactor.report`` has TensorBoard and plots observers."""

    def on_start(self, run: RunStart) -> None: ...

    def on_batch(self, metrics: BatchMetrics) -> None: ...

    def on_evaluation(self, metrics: SplitMetrics) -> None: ...

    def on_epoch(self, epoch: int, batches_done: int, network: nn.Module) -> None: ...

    def on_checkpoint(self, batches_done: int) -> None: ...

    def on_end(self, summary: dict, network: nn.Module) -> None: ...

    def close(self) -> None: ...
