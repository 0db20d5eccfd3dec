"""Stopping a run that diverged before its weights are checkpointed.

A loss or weight that is NaN or Inf (``nonfinite_problem``), or a layer's loss or weight norm
far above its running value (``DivergenceGuard``), stops the run; the last good checkpoint is
kept.
"""

from __future__ import annotations

import math

import torch
from torch import nn


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

    def __init__(self, factor: float, network: nn.Module, state: dict | None = None) -> None:
        self.factor = factor
        if isinstance(state, dict) and state.get("norm") is not None:
            self.loss, self.norm, self.count = state.get("loss"), list(state["norm"]), int(state["count"])
        else:
            self.loss, self.norm, self.count = None, self.norms(network), 0

    @staticmethod
    def norms(network: nn.Module) -> list[float]:
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


def nonfinite_problem(losses: torch.Tensor, network: nn.Module) -> str | None:
    """What went NaN or Inf among the layers' losses (L,) and parameters, in words; None if nothing."""
    problems = []
    bad = [i + 1 for i, v in enumerate(losses.tolist()) if not math.isfinite(v)]
    if bad:
        problems.append("the loss of layer " + ", ".join(map(str, bad))
                        + f" became {', '.join(str(losses[i - 1].item()) for i in bad)}")
    for i, layer in enumerate(network.layers):
        for name, p in layer.named_parameters():
            if not torch.isfinite(p).all():
                problems.append(f"layer {i + 1} {name.replace('synapse.', '')} holds NaN or Inf")
    return "; ".join(problems) or None
