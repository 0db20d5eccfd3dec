"""What both export modes write alike: arrays in NIR's types, time constants from decays, the
synapse of a layer as an ``Affine`` or ``Conv2d`` node, and each layer's shapes."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import NIRError
from ..model.layers import DecolleLayer
from ..model.network import DecolleNetwork
from .graph import ROLE_KEY

__all__ = ["as_float32", "filled", "time_constant", "synapse_node", "pool_size", "layer_shapes"]


def as_float32(t: torch.Tensor) -> np.ndarray:
    """A tensor's values as a float32 array of their own (NIR stores float32 weights)."""
    return t.detach().cpu().to(torch.float32).numpy().copy()


def filled(shape: tuple[int, ...], value: float) -> np.ndarray:
    """A float64 array of ``shape`` holding ``value`` (one parameter per neuron)."""
    return np.full(shape, value, dtype=np.float64)


def time_constant(dt: float, decay: float, what: str) -> float:
    """``tau = dt / (1 - decay)``: the forward-Euler time constant of a decay per step."""
    if not 0.0 <= decay < 1.0:
        raise NIRError(f"{what} = {decay} cannot be written as a time constant (need 0 <= decay < 1)")
    return dt / (1.0 - decay)


def synapse_node(nir, syn: nn.Module, in_shape: tuple[int, ...], name: str) -> Any:
    """``syn`` as an Affine or Conv2d node with its bias (zeros where it has none); ``name``
    (the layer's) goes into the error for a synapse NIR cannot hold."""
    n_out = syn.weight.shape[0]
    bias = as_float32(syn.bias) if syn.bias is not None else np.zeros(n_out, np.float32)
    meta = {ROLE_KEY: "synapse"}
    if isinstance(syn, nn.Linear):
        return nir.Affine(weight=as_float32(syn.weight), bias=bias, metadata=meta)
    if isinstance(syn, nn.Conv2d):
        if syn.padding_mode != "zeros":
            raise NIRError(f"{name}: padding mode {syn.padding_mode!r} has no NIR equivalent")
        padding = syn.padding if isinstance(syn.padding, str) else tuple(int(p) for p in syn.padding)
        return nir.Conv2d(
            input_shape=tuple(int(s) for s in in_shape[1:]),
            weight=as_float32(syn.weight),
            stride=tuple(int(s) for s in syn.stride),
            padding=padding,
            dilation=tuple(int(d) for d in syn.dilation),
            groups=int(syn.groups),
            bias=bias,
            metadata=meta,
        )
    raise NIRError(f"{name}: synapse {type(syn).__name__} is neither nn.Linear nor nn.Conv2d")


def pool_size(layer: DecolleLayer) -> int:
    """The layer's max-pool kernel (and stride); 1 without a pool."""
    if layer.pool is None:
        return 1
    k = layer.pool.kernel_size
    k = k if isinstance(k, int) else k[0]
    return int(k)


def layer_shapes(network: DecolleNetwork, shape: tuple[int, ...]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(input shape as the traces see it, output shape) of every layer, per sample."""
    out = []
    for layer in network.layers:
        if isinstance(layer.synapse, nn.Linear) and len(shape) > 1:
            shape = (math.prod(shape),)
        out_shape = layer.output_shape(shape)
        out.append((shape, tuple(int(s) for s in out_shape)))
        shape = out_shape
    return out
