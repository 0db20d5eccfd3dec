"""The DECOLLE rule: every layer learns at every step from its own fixed random readout.

What makes it local: a layer's input is the previous layer's spikes *detached*, all state is
detached every step, and each layer's loss depends only on its own readout. Summing the layer
losses before one ``backward()`` therefore gives each layer exactly the gradient of its own
loss (Eq. 7: dW = -eta dL/dS sigma'(U) P), and one optimiser step follows every time step
after the burn-in.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..network import DecolleNetwork

Loss = Literal["smooth_l1", "mse", "cross_entropy"]
LOSSES: tuple[str, ...] = ("smooth_l1", "mse", "cross_entropy")


def local_loss(y: Tensor, labels: Tensor, kind: Loss) -> Tensor:
    """Loss of one readout ``y`` (B, C) against integer ``labels`` (B,), averaged over the batch.

    smooth L1 and MSE compare with one-hot targets; MSE is ``0.5 * sum_k (Y_k - Yhat_k)^2``
    per sample, so its gradient is exactly the error of Eq. 8.
    """
    if kind == "cross_entropy":
        return F.cross_entropy(y, labels)
    target = F.one_hot(labels, y.shape[1]).to(y.dtype)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(y, target)
    if kind == "mse":
        return 0.5 * (y - target).pow(2).sum(1).mean()
    raise ValueError(f"unknown loss {kind!r}; valid: {', '.join(LOSSES)}")


def regulariser(u: Tensor, reg1: float, reg2: float) -> Tensor:
    """Eq. 9: lambda1 <[U + 0.01]+> + lambda2 [0.1 - <U>]+, averages over the layer's neurons."""
    u = u.flatten(1)
    return reg1 * F.relu(u + 0.01).mean() + reg2 * F.relu(0.1 - u.mean(1)).mean()


class SequenceResult(NamedTuple):
    votes: Tensor  # (L, B, C): per layer, how many steps after burn-in voted for each class
    loss: Tensor  # (L,): per layer, mean local loss over the steps after burn-in


def vote(readouts: tuple[Tensor, ...], votes: Tensor) -> None:
    """Add each layer's argmax class at this step to ``votes`` (L, B, C), in place."""
    for i, y in enumerate(readouts):
        votes[i].scatter_add_(1, y.argmax(1, keepdim=True), torch.ones_like(y[:, :1]))


class DecolleRule:
    """Runs sequences through a network and applies the DECOLLE updates online."""

    def __init__(
        self,
        network: DecolleNetwork,
        optimizer: torch.optim.Optimizer,
        loss: Loss = "smooth_l1",
        reg1: float = 0.0,
        reg2: float = 0.0,
        burn_in: int = 0,
    ) -> None:
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)}")
        self.network = network
        self.optimizer = optimizer
        self.loss = loss
        self.reg1, self.reg2 = reg1, reg2
        self.burn_in = burn_in

    def layer_losses(self, out, labels: Tensor) -> Tensor:
        """The local loss of every layer at one step, stacked (L,), graph attached."""
        return torch.stack([
            local_loss(y, labels, self.loss) + regulariser(u, self.reg1, self.reg2)
            for y, u in zip(out.readouts, out.membranes)
        ])

    def train_sequence(self, x: Tensor, labels: Tensor) -> SequenceResult:
        """Learn from one batch of sequences ``x`` (B, T, ...) with class ``labels`` (B,)."""
        net = self.network
        n_layers, steps = len(net.layers), x.shape[1]
        votes = x.new_zeros(n_layers, x.shape[0], len(net.readouts[0].g))
        loss_sum = x.new_zeros(n_layers)
        state = None
        for t in range(steps):
            if t < self.burn_in:
                with torch.no_grad():
                    out, state = net(x[:, t], state)
                continue
            out, state = net(x[:, t], state)
            losses = self.layer_losses(out, labels)
            self.optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            self.optimizer.step()
            loss_sum += losses.detach()
            vote(out.readouts, votes)
        return SequenceResult(votes, loss_sum / max(steps - self.burn_in, 1))


@torch.no_grad()
def predict_sequence(
    network: DecolleNetwork, x: Tensor, labels: Tensor, burn_in: int, loss: Loss = "smooth_l1"
) -> SequenceResult:
    """Inference only: the votes and local losses of every layer, without any autograd."""
    n_layers, steps = len(network.layers), x.shape[1]
    votes = x.new_zeros(n_layers, x.shape[0], len(network.readouts[0].g))
    loss_sum = x.new_zeros(n_layers)
    state = None
    for t in range(steps):
        out, state = network(x[:, t], state)
        if t >= burn_in:
            vote(out.readouts, votes)
            loss_sum += torch.stack([local_loss(y, labels, loss) for y in out.readouts])
    return SequenceResult(votes, loss_sum / max(steps - burn_in, 1))
