"""TensorBoard logging of a run, next to its metrics.jsonl (``RUN_DIR/tensorboard``).

Per training batch: every layer's local loss and firing rate, and the learning rate. Per
epoch (and per extra test evaluation): per-layer accuracy, loss and firing rate of the
training and test splits, and histograms of every layer's weights and biases. The step is the
number of training batches done. A resumed run purges the events written after its checkpoint,
so the curves have neither gaps nor doubles. ``tensorboard --logdir RUN_DIR`` shows them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from ..run.observer import BatchMetrics, Observer, RunStart, SplitMetrics

TENSORBOARD_DIR = "tensorboard"


class NullLog:
    """Logging switched off (train.tensorboard: false, or tensorboard not installed)."""

    def batch_metrics(self, step: int, losses: Sequence[float], rates: Sequence[float], lr: float) -> None:
        pass

    def epoch_metrics(self, step: int, split: str, accs: Sequence[float], losses: Sequence[float],
                      rates: Sequence[float]) -> None:
        pass

    def weights(self, step: int, network) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLog(NullLog):
    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step, flush_secs=30)

    def batch_metrics(self, step, losses, rates, lr) -> None:
        w = self.writer
        for i, (loss, rate) in enumerate(zip(losses, rates)):
            w.add_scalar(f"batch_loss/layer{i + 1}", loss, step)
            w.add_scalar(f"batch_firing_rate/layer{i + 1}", rate, step)
        w.add_scalar("lr", lr, step)

    def epoch_metrics(self, step, split, accs, losses, rates) -> None:
        w = self.writer
        for i, (acc, loss, rate) in enumerate(zip(accs, losses, rates)):
            w.add_scalar(f"{split}/accuracy/layer{i + 1}", acc, step)
            w.add_scalar(f"{split}/error/layer{i + 1}", 1.0 - acc, step)
            w.add_scalar(f"{split}/loss/layer{i + 1}", loss, step)
            w.add_scalar(f"{split}/firing_rate/layer{i + 1}", rate, step)

    def weights(self, step, network) -> None:
        for i, layer in enumerate(network.layers):
            for name, p in layer.synapse.named_parameters():
                self.writer.add_histogram(f"layer{i + 1}/{name}", p.detach().float().cpu(), step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_tensorboard(
    enabled: bool, run_dir: Path, purge_step: int | None, log: Callable[[str], None] = print
) -> NullLog:
    """A TensorBoard log in ``run_dir/tensorboard``, or a no-op when off or unavailable."""
    if not enabled:
        return NullLog()
    try:
        return TensorBoardLog(Path(run_dir) / TENSORBOARD_DIR, purge_step)
    except ImportError:
        log("tensorboard: not installed, so only metrics.jsonl is written "
            "(pip install tensorboard, or set train.tensorboard: false)")
        return NullLog()


class TensorBoardObserver(Observer):
    """Writes a run's TensorBoard events into ``RUN_DIR/tensorboard`` as the trainer reports:
    batch losses and rates, every evaluation, weight histograms per epoch. Without the
    ``tensorboard`` package it says so once and writes nothing."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.board: NullLog = NullLog()

    def on_start(self, run: RunStart) -> None:
        # a resumed run drops the events written after its checkpoint
        self.board = open_tensorboard(True, self.run_dir, run.batches_done + 1 if run.resumed else None, run.log)

    def on_batch(self, m: BatchMetrics) -> None:
        self.board.batch_metrics(m.batches_done, m.loss, m.firing_rate, m.lr)

    def on_evaluation(self, m: SplitMetrics) -> None:
        self.board.epoch_metrics(m.batches_done, m.split, m.accuracy, m.loss, m.firing_rate)

    def on_epoch(self, epoch: int, batches_done: int, network) -> None:
        self.board.weights(batches_done, network)

    def on_checkpoint(self, batches_done: int) -> None:
        self.board.flush()

    def close(self) -> None:
        self.board.close()
