"""A stack of DECOLLE layers, each with its own fixed local readout, built from a config."""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import Tensor, nn

from ..config import NetworkConfig
from .layers import DecolleLayer, LIFLayer, LocalReadout, ReadoutDropout
from .neurons import DecolleParams, DecolleState, LIFParams


class NetworkOutput(NamedTuple):
    spikes: tuple[Tensor, ...]  # S of every layer
    membranes: tuple[Tensor, ...]  # U of every layer
    readouts: tuple[Tensor, ...]  # Y = G dropout(S) of every layer


NetworkState = tuple[DecolleState, ...]


class DecolleNetwork(nn.Module):
    """Layers feed forward; readouts hang off each layer and feed nothing."""

    def __init__(
        self,
        layers: Sequence[DecolleLayer],
        readouts: Sequence[LocalReadout],
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(layers) != len(readouts):
            raise ValueError(f"{len(layers)} layers but {len(readouts)} readouts")
        self.layers = nn.ModuleList(layers)
        self.readouts = nn.ModuleList(readouts)
        self.dropout = ReadoutDropout(dropout)

    def forward(
        self, x: Tensor, state: NetworkState | None = None, detach: bool = True
    ) -> tuple[NetworkOutput, NetworkState]:
        """One time step. With ``detach`` (DECOLLE) no gradient crosses a layer or a step."""
        spikes, membranes, readouts, states = [], [], [], []
        for i, (layer, readout) in enumerate(zip(self.layers, self.readouts)):
            out, st = layer(x, None if state is None else state[i])
            spikes.append(out.s)
            membranes.append(out.u)
            readouts.append(readout(self.dropout(out.s)))
            # Any layer's state (DECOLLE's or LIF's) is a NamedTuple of tensors.
            states.append(type(st)(*(t.detach() for t in st)) if detach else st)
            x = out.s.detach() if detach else out.s
        return NetworkOutput(tuple(spikes), tuple(membranes), tuple(readouts)), tuple(states)


def build_network(
    cfg: NetworkConfig,
    input_shape: tuple[int, ...],
    n_classes: int,
    seed: int = 0,
) -> DecolleNetwork:
    """The network of ``cfg`` for one sample's input shape, e.g. (2, 32, 32)."""
    if cfg.neuron_model == "lif":  # soft-reset LIF neurons (S-TLLR); see build_lif_network
        return build_lif_network(cfg, input_shape, n_classes, seed)
    gen = torch.Generator().manual_seed(seed)
    params = DecolleParams(**vars(cfg.neuron))
    layers, readouts = [], []
    shape = tuple(input_shape)
    for i, lc in enumerate(cfg.layers):
        if lc.type == "conv":
            if len(shape) != 3:
                raise ValueError(f"network.layers.{i}: a conv layer needs (C, H, W) input, got {shape}")
            pad = lc.kernel // 2 if lc.padding is None else lc.padding
            synapse: nn.Module = nn.Conv2d(shape[0], lc.channels, lc.kernel, padding=pad)
            pool = lc.pool
        else:
            if lc.pool != 1:
                raise ValueError(f"network.layers.{i}: a dense layer cannot pool (pool = {lc.pool})")
            synapse = nn.Linear(math.prod(shape), lc.channels)
            pool = 1
        _reset(synapse, gen)
        layer = DecolleLayer(synapse, params, pool, cfg.surrogate)
        try:
            shape = layer.output_shape(shape)
        except RuntimeError:  # torch refuses a pooling / kernel larger than its input
            raise ValueError(f"network.layers.{i}: output shape of input {shape} is empty; reduce pooling or kernel") from None
        if min(shape) < 1:
            raise ValueError(f"network.layers.{i}: output shape {shape} is empty; reduce pooling")
        layers.append(layer)
        readouts.append(
            LocalReadout(math.prod(shape), n_classes, cfg.readout_scale, cfg.feedback_alignment, gen,
                         cfg.readout_bias)
        )
    return DecolleNetwork(layers, readouts, cfg.dropout)


def _reset(synapse: nn.Module, gen: torch.Generator) -> None:
    """PyTorch's default (Kaiming-uniform) init, but drawn from our generator for reproducibility."""
    w = synapse.weight
    bound = 1.0 / math.sqrt(w[0].numel())
    with torch.no_grad():
        w.copy_((torch.rand(w.shape, generator=gen) * 2 - 1) * bound)
        synapse.bias.copy_((torch.rand(synapse.bias.shape, generator=gen) * 2 - 1) * bound)


@torch.no_grad()
def lsuv_init(
    network: DecolleNetwork,
    x: Tensor,
    target_mean: float = 0.0,
    mean_tol: float = 0.2,
    var_tol: float = 0.1,
    max_iter: int = 50,
    skip_steps: int = 0,
) -> list[tuple[float, float]]:
    """Data-driven init (layer-sequential unit variance), after the authors' current code (docs/decolle.md
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
        damping = 1.0 - layer.params.gamma if isinstance(network, LIFNetwork) else 1.0
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


# --- the same stack with soft-reset LIF neurons (S-TLLR; BPTT on the same network) ---------


class LIFNetwork(DecolleNetwork):
    """LIF layers feeding forward, each with its fixed local readout: the same stack and
    interface as ``DecolleNetwork``, with ``LIFLayer``s (``membranes`` are the neurons' u,
    ``spikes`` the layers' outputs after pooling)."""


def build_lif_network(
    cfg: NetworkConfig,
    input_shape: tuple[int, ...],
    n_classes: int,
    seed: int = 0,
) -> LIFNetwork:
    """``cfg``'s layer stack with soft-reset LIF neurons (``cfg.lif``), pooling on the spikes,
    and recurrent synapses on the dense layers that ask for them."""
    gen = torch.Generator().manual_seed(seed)
    params = LIFParams(cfg.lif.gamma, cfg.lif.v_th, cfg.lif.reset)
    layers, readouts = [], []
    shape = tuple(input_shape)
    for i, lc in enumerate(cfg.layers):
        recurrent = None
        if lc.type == "conv":
            if len(shape) != 3:
                raise ValueError(f"network.layers.{i}: a conv layer needs (C, H, W) input, got {shape}")
            if lc.recurrent:
                raise ValueError(f"network.layers.{i}: only dense layers can be recurrent")
            pad = lc.kernel // 2 if lc.padding is None else lc.padding
            synapse: nn.Module = nn.Conv2d(shape[0], lc.channels, lc.kernel, padding=pad)
        else:
            if lc.pool != 1:
                raise ValueError(f"network.layers.{i}: a dense layer cannot pool (pool = {lc.pool})")
            synapse = nn.Linear(math.prod(shape), lc.channels)
            if lc.recurrent:
                recurrent = nn.Linear(lc.channels, lc.channels, bias=False)
        _reset(synapse, gen)
        if recurrent is not None:
            bound = 1.0 / math.sqrt(lc.channels)
            with torch.no_grad():
                recurrent.weight.copy_((torch.rand(recurrent.weight.shape, generator=gen) * 2 - 1) * bound)
        layer = LIFLayer(synapse, params, lc.pool if lc.type == "conv" else 1, cfg.surrogate, recurrent)
        try:
            shape = layer.output_shape(shape)
        except RuntimeError:
            raise ValueError(f"network.layers.{i}: output shape of input {shape} is empty; reduce pooling or kernel") from None
        if min(shape) < 1:
            raise ValueError(f"network.layers.{i}: output shape {shape} is empty; reduce pooling")
        layers.append(layer)
        readouts.append(
            LocalReadout(math.prod(shape), n_classes, cfg.readout_scale, cfg.feedback_alignment, gen,
                         cfg.readout_bias)
        )
    return LIFNetwork(layers, readouts, cfg.dropout)
