"""Backpropagation through time on the same networks: the baseline the local rules are measured by.

Nothing is detached: the network runs with ``detach=False``, so gradients cross layers and
steps (the burn-in steps included: they shape the state the later losses depend on). The loss
is summed over every step after the burn-in (and over the layers of ``loss_layers``); one
``backward()`` and one optimiser step follow each sequence. The graph of the whole sequence
is held until then, so memory grows linearly with the number of steps T. ``precision="bf16"``
runs the network's steps under ``torch.autocast`` (``model.precision``) with fp32 losses.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ..model.precision import Precision, autocast, parameter_device, resolve_precision
from .common import Loss, SequenceResult, SequenceTally, layer_losses, resolve_loss


class BPTTRule:
    """Full-gradient training of a ``DecolleNetwork``, whatever its layers (DECOLLE, LIF, or a
    user's layers that keep the step contract, ``DecolleNetwork.from_layers``).

    Its per-step losses are DECOLLE's (``layer_losses``); only what is detached and when the
    optimiser steps differ.
    """

    def __init__(
        self,
        network,
        optimizer: torch.optim.Optimizer,
        loss: Loss = "smooth_l1",
        reg1: float = 0.0,
        reg2: float = 0.0,
        burn_in: int = 0,
        loss_layers: Literal["all", "last"] = "all",
        precision: Precision = "fp32",
        window: int | None = None,
    ) -> None:
        """``window``: truncated BPTT, one update per ``window`` steps, backpropagating within
        the window only (the state is carried over, detached); None: one update per sequence."""
        if loss_layers not in ("all", "last"):
            raise ValueError(f"unknown loss_layers {loss_layers!r}; valid: all, last")
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 or None, got {window}")
        self.window = window
        self.network = network
        self.optimizer = optimizer
        self.loss = resolve_loss(loss)
        self.reg1, self.reg2 = reg1, reg2
        self.burn_in = burn_in
        self.loss_layers = loss_layers
        self.precision = resolve_precision(precision, parameter_device(network))

    def train_sequence(self, x: Tensor, labels: Tensor, state: tuple | None = None) -> SequenceResult:
        """Learn from one batch of sequences ``x`` (B, T, ...): one update for the whole sequence,
        or one per ``window`` steps. ``state``: continue from the (detached) network state a
        previous call ended in, with no burn-in."""
        net = self.network
        burn_in = self.burn_in if state is None else 0
        tally = SequenceTally(net, x, burn_in)
        total = None
        updates = 0
        for t in range(x.shape[1]):
            with autocast(self.precision, x.device):
                out, state = net(x[:, t], state, detach=False)
            if self.precision != "fp32":  # losses and votes from fp32 readouts
                out = out._replace(readouts=tuple(y.float() for y in out.readouts))
            tally.count_spikes(out.spikes)
            if t < burn_in:
                continue
            losses = layer_losses(out, labels, self.loss, self.reg1, self.reg2)
            step_loss = losses.sum() if self.loss_layers == "all" else losses[-1]
            total = step_loss if total is None else total + step_loss
            tally.count_step(out.readouts, losses)
            if self.window is not None and (t - burn_in + 1) % self.window == 0:
                self._update(total)
                total, updates = None, updates + 1
                state = tuple(type(s)(*(v.detach() for v in s)) for s in state)  # truncated here
        if total is not None:
            self._update(total)
            updates += 1
        return tally.result({"optimizer_steps": updates}, state)

    def _update(self, total: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
