"""What every learning rule shares: the ``Rule`` protocol, the local losses (built-in by name,
or any user cost), the regulariser, the per-layer vote and inference.

A local cost is a callable ``cost(readout, target, layer_index) -> scalar``: ``readout`` is
one layer's Y (B, C) at one step, ``target`` what the data gives for the batch (class
indices (B,) for classification, any tensor for regression). The rule forms the update from
it by autograd, inside one layer and one step: the paper's claim that the plasticity rule
follows from any local cost.
"""

from __future__ import annotations

import importlib
from typing import Callable, Literal, NamedTuple, Protocol, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from ..errors import LocalCostError
from ..model.precision import autocast, resolve_precision

LossName = Literal["smooth_l1", "mse", "cross_entropy"]
LOSSES: tuple[str, ...] = ("smooth_l1", "mse", "cross_entropy")
LocalCost = Callable[[Tensor, Tensor, int], Tensor]
Loss = Union[LossName, LocalCost]


class SequenceResult(NamedTuple):
    votes: Tensor  # (L, B, C): per layer, how many steps after burn-in voted for each class
    loss: Tensor  # (L,): per layer, mean local loss over the steps after burn-in
    rates: Tensor  # (L,) float64: per layer, spikes per neuron per step over every step (burn-in too)
    stats: dict | None = None  # rule-specific numbers (e.g. the fraction of triggered updates)
    # the network's state after the last step, detached: pass it as ``state`` to continue the
    # sequence (a stream) where this batch ended
    state: tuple | None = None


class Rule(Protocol):
    """A learning rule: it runs a batch of sequences through its network and learns from them."""

    network: torch.nn.Module
    optimizer: torch.optim.Optimizer

    def train_sequence(self, x: Tensor, labels: Tensor) -> SequenceResult:
        """Learn from ``x`` (B, T, ...) with targets ``labels``; the votes, losses and firing
        rates per layer."""
        ...


def resolve_loss(loss: Loss | str) -> Loss:
    """A built-in loss name as it is, a callable as it is, or the callable that a dotted path
    (``package.module:function`` or ``package.module.function``) names."""
    if callable(loss) or loss in LOSSES:
        return loss
    if not isinstance(loss, str) or not any(c in loss for c in ".:"):
        raise ValueError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)}, or a callable "
                         "cost(readout, target, layer_index) -> scalar (in a config: its dotted import path)")
    module_name, _, attr = loss.partition(":") if ":" in loss else loss.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"loss {loss!r}: cannot import {attr!r} from {module_name!r} ({err})") from None
    if not callable(fn):
        raise ValueError(f"loss {loss!r} is a {type(fn).__name__}, not a callable cost")
    return fn


def local_loss(y: Tensor, labels: Tensor, kind: Loss, target: Tensor | None = None,
               layer: int = 0) -> Tensor:
    """Loss of one readout ``y`` (B, C) against ``labels``, averaged over the batch.

    Built-in ``kind``s compare with class indices (B,): smooth L1 and MSE against one-hot
    targets (``target``, when the caller has it already); MSE is ``0.5 * sum_k (Y_k - Yhat_k)^2``
    per sample, so its gradient is exactly the error of Eq. 8. A callable ``kind`` is a user
    cost, called as ``kind(y, labels, layer)``.
    """
    if callable(kind):
        value = kind(y, labels, layer)
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise LocalCostError(f"the local cost {getattr(kind, '__name__', kind)!r} returned "
                                 f"{type(value).__name__}{'' if not isinstance(value, Tensor) else f' of shape {tuple(value.shape)}'}, "
                                 "not a scalar tensor")
        return value.reshape(())
    if kind == "cross_entropy":
        return F.cross_entropy(y, labels)
    if target is None:
        target = F.one_hot(labels, y.shape[1]).to(y.dtype)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(y, target)
    if kind == "mse":
        return 0.5 * (y - target).pow(2).sum(1).mean()
    raise ValueError(f"unknown loss {kind!r}; valid: {', '.join(LOSSES)}")


def loss_grad(y: Tensor, target: Tensor, kind: LossName) -> Tensor:
    """dL/dY of a built-in ``local_loss(y, labels, kind)``; ``target`` is the one-hot of ``labels``."""
    if kind == "smooth_l1":  # mean over B x C of 0.5 d^2 (|d| < 1) or |d| - 0.5
        return (y - target).clamp_(-1.0, 1.0).div_(y.numel())
    if kind == "mse":
        return (y - target).div_(y.shape[0])
    if kind == "cross_entropy":
        return (torch.softmax(y, 1) - target).div_(y.shape[0])
    raise ValueError(f"unknown loss {kind!r}; valid: {', '.join(LOSSES)}")


def regulariser(u: Tensor, reg1: float, reg2: float) -> Tensor:
    """Eq. 9: lambda1 <[U + 0.01]+> + lambda2 [0.1 - <U>]+, averages over the layer's neurons."""
    u = u.flatten(1)
    return reg1 * F.relu(u + 0.01).mean() + reg2 * F.relu(0.1 - u.mean(1)).mean()


def regulariser_grad(u: Tensor, reg1: float, reg2: float) -> Tensor:
    """dL/dU of ``regulariser(u, reg1, reg2)``, shaped like ``u``."""
    flat = u.flatten(1)
    b, n = flat.shape
    grad = (flat > -0.01).to(u.dtype).mul_(reg1 / (b * n))
    below = (flat.mean(1, keepdim=True) < 0.1).to(u.dtype)
    grad = grad - below * (reg2 / (b * n))
    return grad.view(u.shape)


def layer_losses(out, labels: Tensor, loss: Loss, reg1: float = 0.0, reg2: float = 0.0) -> Tensor:
    """The local loss of every layer at one step (``out``: a ``NetworkOutput``), stacked (L,),
    graph attached."""
    return torch.stack([
        local_loss(y, labels, loss, layer=i) + regulariser(u, reg1, reg2)
        for i, (y, u) in enumerate(zip(out.readouts, out.membranes))
    ])


def check_local(out, target: Tensor, cost: LocalCost, network) -> None:
    """Refuse a cost whose loss for layer i (on the step output ``out``) reaches another
    layer's parameters: locality is what makes the update of every layer its own (one sentence
    naming both layers). It evaluates the cost once more per layer, apart, and walks its graph."""
    # keyed by storage: the tensor an AccumulateGrad node hands back need not be the same
    # Python object as the parameter
    owner = {p.data_ptr(): i for i, layer in enumerate(network.layers) for p in layer.parameters()}
    for i, y in enumerate(out.readouts):
        seen, stack = set(), [local_loss(y, target, cost, layer=i).grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            variable = getattr(node, "variable", None)
            if variable is not None and owner.get(variable.data_ptr(), i) != i:
                raise LocalCostError(
                    f"the local cost of layer {i} depends on the parameters of layer {owner[variable.data_ptr()]}: "
                    "a local cost may use only its own layer's readout and the target")
            stack.extend(fn for fn, _ in node.next_functions)


def vote(readouts: Sequence[Tensor], votes: Tensor) -> None:
    """Add each layer's argmax class at this step to ``votes`` (L, B, C), in place."""
    with torch.no_grad():
        winners = torch.stack(tuple(readouts)).argmax(2, keepdim=True)  # (L, B, 1): all layers at once
        votes.scatter_add_(2, winners, torch.ones_like(winners, dtype=votes.dtype))


class SequenceTally:
    """What every rule counts over one batch of sequences ``x`` (B, T, ...): each layer's spikes
    at every step, its votes and local losses at the steps after the burn-in. Everything stays
    on the device until ``result`` (no host sync per step)."""

    def __init__(self, network, x: Tensor, burn_in: int) -> None:
        n_layers = len(network.layers)
        self.votes = x.new_zeros(n_layers, x.shape[0], network.readouts[0].g.shape[0])
        self.loss_sum = x.new_zeros(n_layers)
        self.spike_sum = x.new_zeros(n_layers, dtype=torch.float64)
        self.outputs = [0] * n_layers  # elements of one step's spikes (B x neurons), per layer
        self.steps = 0
        self.learn_steps = 0

    def count_spikes(self, spikes: Sequence[Tensor]) -> None:
        """Every step: add each layer's spikes S (its output, what the next layer sees)."""
        with torch.no_grad():
            self.spike_sum += torch.stack([s.sum() for s in spikes])
        if self.steps == 0:
            self.outputs = [s.numel() for s in spikes]
        self.steps += 1

    def count_step(self, readouts: Sequence[Tensor], losses: Tensor | None = None) -> None:
        """A step after the burn-in: each layer's vote, and its local loss (L,) when given."""
        vote(readouts, self.votes)
        if losses is not None:
            self.loss_sum += losses.detach()
        self.learn_steps += 1

    def result(self, stats: dict | None = None, state: tuple | None = None) -> SequenceResult:
        """Votes, mean losses over the steps after the burn-in, mean firing rates, and the
        network's last ``state`` (detached)."""
        per_step = torch.tensor(self.outputs, dtype=torch.float64) * max(self.steps, 1)
        if state is not None:
            state = tuple(type(s)(*(v.detach() for v in s)) for s in state)
        return SequenceResult(self.votes, self.loss_sum / max(self.learn_steps, 1),
                              self.spike_sum / per_step.to(self.spike_sum.device), stats, state)


@torch.no_grad()
def predict_sequence(
    network, x: Tensor, labels: Tensor | None = None, burn_in: int = 0, loss: Loss = "smooth_l1",
    precision: str = "fp32", state: tuple | None = None,
) -> SequenceResult:
    """Inference only: the votes of every layer, its firing rate and, with ``labels``, its mean
    local loss (zeros without), without any autograd. ``precision``: ``fp32``, ``bf16`` or
    ``auto`` (``model.precision``); in bf16 the network's step runs under autocast and the
    votes and losses come from its readouts in fp32. ``state``: continue from a network state
    (a ``SequenceResult.state``) instead of the resting one."""
    precision = resolve_precision(precision, x.device)
    tally = SequenceTally(network, x, burn_in)
    for t in range(x.shape[1]):
        with autocast(precision, x.device):
            out, state = network(x[:, t], state)
        tally.count_spikes(out.spikes)
        if t >= burn_in:
            readouts = [y.float() for y in out.readouts]
            losses = None if labels is None else torch.stack(
                [local_loss(y, labels, loss, layer=i) for i, y in enumerate(readouts)])
            tally.count_step(readouts, losses)
    return tally.result(state=state)
