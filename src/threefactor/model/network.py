"""A stack of spiking layers, each with its own fixed local readout: built from a config, or
around any layers that keep the step contract (``layers.SpikingLayer``)."""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from ..config import LayerConfig, NetworkConfig
from ..errors import LayerContractError
from .init import reset_parameters
from .layers import DecolleLayer, LIFLayer, LocalReadout, ReadoutDropout, SpikingLayer
from .neurons import DecolleParams, LIFParams


class NetworkOutput(NamedTuple):
    spikes: tuple[Tensor, ...]  # S of every layer
    membranes: tuple[Tensor, ...]  # U of every layer
    readouts: tuple[Tensor, ...]  # Y = G dropout(S) of every layer


NetworkState = tuple[tuple[Tensor, ...], ...]  # every layer's state, a NamedTuple of tensors


class DecolleNetwork(nn.Module):
    """Layers feed forward; readouts hang off each layer and feed nothing.

    The layers are ``DecolleLayer``s, ``LIFLayer``s (``build_network``) or any modules that
    keep the step contract of ``SpikingLayer`` (``from_layers``)."""

    def __init__(
        self,
        layers: Sequence[SpikingLayer],
        readouts: Sequence[LocalReadout],
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(layers) != len(readouts):
            raise ValueError(f"{len(layers)} layers but {len(readouts)} readouts")
        self.layers = nn.ModuleList(layers)
        self.readouts = nn.ModuleList(readouts)
        self.dropout = ReadoutDropout(dropout)

    @classmethod
    def from_layers(
        cls,
        layers: Sequence[SpikingLayer],
        input_shape: tuple[int, ...],
        n_classes: int,
        *,
        readout_scale: float = 0.5,
        seed: int = 0,
        dropout: float = 0.0,
        feedback_alignment: bool = False,
        readout_bias: bool = False,
    ) -> "DecolleNetwork":
        """The network of ``layers`` (any modules that keep the ``SpikingLayer`` contract), each
        with a fixed random readout to ``n_classes`` (drawn from ``seed``) sized by probing the
        layer with one step on zeros of one sample's input shape, e.g. (2, 32, 32), and placed
        on the device and dtype of its spikes. A layer that breaks the contract is refused in one
        sentence (``LayerContractError``)."""
        gen = torch.Generator().manual_seed(seed)
        readouts = []
        shape = tuple(input_shape)
        for i, layer in enumerate(layers):
            s = probe_spikes(layer, shape, i)
            shape = tuple(s.shape[1:])
            readouts.append(LocalReadout(math.prod(shape), n_classes, readout_scale, feedback_alignment, gen,
                                         readout_bias).to(s.device, s.dtype))
        return cls(layers, readouts, dropout)

    def supports_closed_form(self) -> bool:
        """Whether the DECOLLE rule's closed form computes this network's step: this class's own
        ``forward``, ``LocalReadout``s that run their own forward, and layers that say they are
        ones it computes (``DecolleLayer.supports_closed_form``)."""
        return (type(self).forward is DecolleNetwork.forward
                and all(isinstance(r, LocalReadout) and type(r).forward is LocalReadout.forward
                        for r in self.readouts)
                and all(isinstance(layer, DecolleLayer) and layer.supports_closed_form() for layer in self.layers))

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
            # Every layer's state is a NamedTuple of tensors (the step contract).
            states.append(type(st)(*(t.detach() for t in st)) if detach else st)
            x = out.s.detach() if detach else out.s
        return NetworkOutput(tuple(spikes), tuple(membranes), tuple(readouts)), tuple(states)


def probe_spikes(layer: nn.Module, input_shape: tuple[int, ...], index: int) -> Tensor:
    """The spikes (1, ...) of one step of ``layer`` (the ``index``-th of a network) on zeros of
    one sample's ``input_shape`` (no gradient, in eval mode), after checking that the step keeps
    the ``SpikingLayer`` contract."""
    name = f"layer {index} ({type(layer).__name__})"
    if not isinstance(layer, nn.Module):
        raise LayerContractError(f"{name} is not a torch.nn.Module, so the optimiser cannot see its parameters")
    like = next(layer.parameters(), None)
    x = torch.zeros((1, *input_shape), device=None if like is None else like.device,
                    dtype=torch.float32 if like is None else like.dtype)
    was_training = layer.training
    layer.eval()
    try:
        with torch.no_grad():
            result = layer(x, None)
    except (TypeError, ValueError, RuntimeError) as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise LayerContractError(f"{name} fails one step layer(x, None) on zeros of shape {tuple(x.shape)}: "
                                 f"{type(err).__name__}: {first}") from err
    finally:
        layer.train(was_training)
    if not (isinstance(result, tuple) and len(result) == 2) or hasattr(result, "s"):  # an output alone
        raise LayerContractError(f"{name} returns {type(result).__name__} from one step, not a pair (out, state)")
    out, state = result
    for field, what in (("s", "spikes"), ("u", "membrane potentials")):
        value = getattr(out, field, None)
        if not (isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == 1):
            raise LayerContractError(f"{name}'s step output has no tensor .{field} ({what}) with the batch "
                                     f"as its first dimension (got {type(value).__name__})")
    if not (isinstance(state, tuple) and hasattr(state, "_fields") and all(isinstance(t, Tensor) for t in state)):
        raise LayerContractError(f"{name}'s state is a {type(state).__name__}, not a NamedTuple of tensors")
    if not out.s.is_floating_point():
        raise LayerContractError(f"{name}'s spikes .s are {out.s.dtype}, not floating point "
                                 "(the readout multiplies them)")
    return out.s


# --- building a network from its config ----------------------------------------------------


def _synapse(lc: LayerConfig, shape: tuple[int, ...], index: int) -> nn.Linear | nn.Conv2d:
    """The synapse of layer config ``lc`` for one sample's input ``shape``."""
    if lc.type == "conv":
        if len(shape) != 3:
            raise ValueError(f"network.layers.{index}: a conv layer needs (C, H, W) input, got {shape}")
        pad = lc.kernel // 2 if lc.padding is None else lc.padding
        return nn.Conv2d(shape[0], lc.channels, lc.kernel, padding=pad)
    if lc.pool != 1:
        raise ValueError(f"network.layers.{index}: a dense layer cannot pool (pool = {lc.pool})")
    return nn.Linear(math.prod(shape), lc.channels)


def _decolle_layer(cfg: NetworkConfig, lc: LayerConfig, synapse: nn.Module, gen: torch.Generator,
                   index: int) -> DecolleLayer:
    """DECOLLE neurons (``cfg.neuron``); max-pooling of the membrane, before the spike."""
    return DecolleLayer(synapse, DecolleParams(**vars(cfg.neuron)), lc.pool if lc.type == "conv" else 1,
                        cfg.surrogate)


def _lif_layer(cfg: NetworkConfig, lc: LayerConfig, synapse: nn.Module, gen: torch.Generator,
               index: int) -> LIFLayer:
    """Soft- or hard-reset LIF neurons (``cfg.lif``); max-pooling of the spikes, after the
    neurons; a recurrent synapse on the dense layers that ask for one."""
    recurrent = None
    if lc.recurrent:
        if lc.type == "conv":
            raise ValueError(f"network.layers.{index}: only dense layers can be recurrent")
        recurrent = nn.Linear(lc.channels, lc.channels, bias=False)
        bound = 1.0 / math.sqrt(lc.channels)
        with torch.no_grad():
            recurrent.weight.copy_((torch.rand(recurrent.weight.shape, generator=gen) * 2 - 1) * bound)
    params = LIFParams(cfg.lif.gamma, cfg.lif.v_th, cfg.lif.reset)
    return LIFLayer(synapse, params, lc.pool if lc.type == "conv" else 1, cfg.surrogate, recurrent)


# network.neuron_model -> the layer of one layer config around its (initialised) synapse
NEURON_LAYERS: dict[str, Callable[..., nn.Module]] = {"decolle": _decolle_layer, "lif": _lif_layer}


def build_network(
    cfg: NetworkConfig,
    input_shape: tuple[int, ...],
    n_classes: int,
    seed: int = 0,
) -> DecolleNetwork:
    """The network of ``cfg`` for one sample's input shape, e.g. (2, 32, 32): its layer stack
    with the neurons of ``cfg.neuron_model`` (``decolle``: ``DecolleLayer``; ``lif``: the
    soft-reset ``LIFLayer`` of S-TLLR), each with its fixed random readout. Synapses, recurrent
    synapses and readouts are drawn from ``seed``, layer by layer."""
    try:
        make_layer = NEURON_LAYERS[cfg.neuron_model]
    except KeyError:
        raise ValueError(f"unknown network.neuron_model {cfg.neuron_model!r}; "
                         f"valid: {', '.join(NEURON_LAYERS)}") from None
    gen = torch.Generator().manual_seed(seed)
    layers, readouts = [], []
    shape = tuple(input_shape)
    for i, lc in enumerate(cfg.layers):
        synapse = _synapse(lc, shape, i)
        reset_parameters(synapse, gen)
        layer = make_layer(cfg, lc, synapse, gen, i)
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
