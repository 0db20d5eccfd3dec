"""Evaluation without learning: per-layer accuracy, local loss and firing rate over batches."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from ..rules.common import predict_sequence
from . import collective
from .collective import DistInfo


def batch_accuracy(votes: Tensor, labels: Tensor) -> Tensor:
    """Per-layer number of samples whose most voted class is the label, (L,)."""
    return (votes.argmax(2) == labels[None]).sum(1)


def evaluate(
    network: nn.Module, batches: Iterable, loss: Any = "smooth_l1", burn_in: int = 0,
    device: torch.device | None = None, info: DistInfo = collective.SINGLE,
    unpack: Callable[[Any, str], tuple[Tensor, Tensor]] | None = None, precision: str = "fp32",
) -> tuple[list[float], list[float], list[float]]:
    """Per-layer accuracy, mean local loss and firing rate of ``network`` over ``batches`` of
    ``(frames, labels)``, without learning, computed at ``precision`` (``predict_sequence``:
    the precision the network trains in, so that a bf16 run is judged as it runs). Under
    torchrun (``info``) every process takes its share of each batch and the sums are added over
    the processes."""
    device = device if device is not None else next(network.parameters()).device
    was_training = network.training
    network.eval()
    n = len(network.layers)
    sums = torch.zeros(3 * n + 1, dtype=torch.float64)
    for b, batch in enumerate(batches, start=1):
        if unpack is not None:
            x, y = unpack(batch, f"test batch {b}")
        else:
            x, y = batch[0].to(device, torch.float32), batch[1].to(device)
        lo, hi = collective.shard(len(y), info.rank, info.world_size)
        if hi == lo:
            continue
        x, y = x[lo:hi], y[lo:hi]
        res = predict_sequence(network, x, y, burn_in, loss, precision)
        sums[:n] += batch_accuracy(res.votes, y).cpu().double()
        sums[n:2 * n] += res.loss.cpu().double() * len(y)
        sums[2 * n:3 * n] += res.rates.cpu().double() * len(y)
        sums[-1] += len(y)
    if info.enabled:
        sums = collective.all_reduce_sum(sums)
    network.train(was_training)
    count = max(float(sums[-1]), 1.0)
    return ((sums[:n] / count).tolist(), (sums[n:2 * n] / count).tolist(), (sums[2 * n:3 * n] / count).tolist())
