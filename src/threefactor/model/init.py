"""Initialisation of a network's synapses: PyTorch's default drawn from a seeded generator,
and the data-driven LSUV."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .neurons import LIFParams


def reset_parameters(synapse: nn.Module, gen: torch.Generator) -> None:
    """PyTorch's default (Kaiming-uniform) init of a synapse's weight and bias, drawn from
    ``gen`` for reproducibility."""
    w = synapse.weight
    bound = 1.0 / math.sqrt(w[0].numel())
    with torch.no_grad():
        w.copy_((torch.rand(w.shape, generator=gen) * 2 - 1) * bound)
        synapse.bias.copy_((torch.rand(synapse.bias.shape, generator=gen) * 2 - 1) * bound)


@torch.no_grad()
def lsuv_init(
    network: nn.Module,
    x: Tensor,
    target_mean: float = 0.0,
    mean_tol: float = 0.2,
    var_tol: float = 0.1,
    max_iter: int = 50,
    skip_steps: int = 0,
) -> list[tuple[float, float]]:
    """Data-driven init (layer-sequential unit variance) of a ``DecolleNetwork`` whose layers
    have a ``synapse`` with weight and bias, after the authors' current code (docs/decolle.md
    says where it differs).

    Weights start orthogonal; then, layer by layer, the weights are rescaled until Var(U) is
    within ``var_tol`` of 1 and the bias shifted until mean U is within ``mean_tol`` of
    ``target_mean``, measured by running the network over ``x`` (B, T, ...) after
    ``skip_steps`` steps. Returns (mean, var) of U for every layer at the end.
    """
    was_training = network.training
    network.eval()

    def membrane_stats(index: int) -> tuple[float, float]:
        state = None
        us = []
        for t in range(x.shape[1]):
            out, state = network(x[:, t], state)
            if t >= skip_steps:
                us.append(out.membranes[index])
        u = torch.stack(us)
        return u.mean().item(), u.var().item()

    for layer in network.layers:
        w = layer.synapse.weight
        nn.init.orthogonal_(w.view(w.shape[0], -1))
        layer.synapse.bias.zero_()
    stats = []
    for i, layer in enumerate(network.layers):
        syn = layer.synapse
        # A LIF membrane integrates its input (gain up to 1 / (1 - gamma) for a constant drive):
        # undamped bias shifts overshoot and the iteration diverges.
        params = getattr(layer, "params", None)
        damping = 1.0 - params.gamma if isinstance(params, LIFParams) else 1.0
        for _ in range(max_iter):
            mean, var = membrane_stats(i)
            var_ok = abs(var - 1.0) < var_tol
            mean_ok = abs(mean - target_mean) < mean_tol
            if var_ok and mean_ok:
                break
            if not var_ok and var > 0:
                syn.weight.div_(math.sqrt(var))
            if not mean_ok:
                syn.bias.sub_((mean - target_mean) * damping)
        stats.append(membrane_stats(i))
    network.train(was_training)
    return stats
