"""Exact mode: every term of the DECOLLE neuron as plain NIR nodes, so that
:func:`threefactor.nir.from_nir` gives back a network with identical spikes. Per layer::

    [Flatten] -> LI (Q, tau_syn) -> [Delay dt, lagged ordering] -> LI (P, tau_mem)
      -> Affine | Conv2d (W, b) -> [SumPool2d marked max] -> Threshold (0) -> next layer
                                                              |   ^
                     LI (R, tau_ref) <------------------------+   |
                          +--> Scale (-rho) ----------------------+   (feedback edge)

With the refractory trace before a max pool the layer's spike is the OR of its unpooled
neurons' spikes: Threshold per neuron, then SumPool2d and Threshold(1/2), plain NIR. With it
after the pool, NIR has no max pooling: the pool node is a ``SumPool2d`` whose metadata says
``{"threefactor_pool": "max"}``, which only threefactor (and the nirtorch node map of
:mod:`threefactor.nir.check`) reads. A Threshold fires on ``U >= 0`` or ``U > 0`` as its
metadata ``comparison`` says.

Discretisation (written into the graph metadata): per time step, nodes are evaluated in the
order of the feed-forward edges; an ``LI`` node integrates with forward Euler,
``x <- x + dt/tau (v_leak - x + r * in)``, i.e. ``x <- d x + (1 - d) in`` with decay
``d = 1 - dt/tau`` (so ``tau = dt/(1 - d)``), and passes on its *updated* state; the feedback
edge ``Scale -> Threshold`` carries the value from the previous step; a ``Delay`` delays by
one step.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..model.layers import LocalReadout
from ..model.network import DecolleNetwork
from ..model.neurons import DecolleParams
from .graph import POOL_KEY, ROLE_KEY, layer_name, readout_name
from .nodes import as_float32, filled, layer_shapes, pool_size, synapse_node, time_constant

__all__ = ["DISCRETISATION", "exact_nodes"]

DISCRETISATION = (
    "per step, nodes are evaluated along the feed-forward edges; LI: forward Euler "
    "x <- x + dt/tau*(v_leak - x + r*in) = d*x + (1-d)*in with d = 1 - dt/tau, passing on the "
    "updated state; the feedback edge (Scale -> Threshold) carries the previous step's value; "
    "Delay: one step"
)


def exact_nodes(
    nir, network: DecolleNetwork, shape: tuple[int, ...], dt: float, include_readouts: bool
) -> tuple[dict[str, Any], list[tuple[str, str]], list[str]]:
    """Nodes, edges and approximation notes (none: the mode is exact) of ``network`` for
    inputs of one sample's ``shape``, with ``dt`` seconds per step."""
    nodes: dict[str, Any] = {"input": nir.Input(input_type={"input": np.array(shape)})}
    edges: list[tuple[str, str]] = []
    prev, prev_shape = "input", shape
    shapes = layer_shapes(network, shape)
    for i, (layer, readout) in enumerate(zip(network.layers, network.readouts)):
        p = layer.params
        in_shape, out_shape = shapes[i]
        name = layer_name(i)
        if tuple(in_shape) != tuple(prev_shape):
            nodes[f"{name}_flatten"] = nir.Flatten(
                input_type={"input": np.array(prev_shape)}, start_dim=0, end_dim=-1
            )
            edges.append((prev, f"{name}_flatten"))
            prev = f"{name}_flatten"
        zeros_in, ones_in = filled(in_shape, 0.0), filled(in_shape, 1.0)
        nodes[f"{name}_q"] = nir.LI(
            tau=filled(in_shape, time_constant(dt, p.beta, "beta")), r=ones_in, v_leak=zeros_in,
            metadata={ROLE_KEY: "synaptic_trace", "decay": float(p.beta)},
        )
        nodes[f"{name}_p"] = nir.LI(
            tau=filled(in_shape, time_constant(dt, p.alpha, "alpha")), r=ones_in.copy(),
            v_leak=zeros_in.copy(), metadata={ROLE_KEY: "membrane_trace", "decay": float(p.alpha)},
        )
        edges.append((prev, f"{name}_q"))
        if p.ordering == "lagged":
            nodes[f"{name}_lag"] = nir.Delay(delay=filled(in_shape, dt), metadata={ROLE_KEY: "lag"})
            edges += [(f"{name}_q", f"{name}_lag"), (f"{name}_lag", f"{name}_p")]
        else:
            edges.append((f"{name}_q", f"{name}_p"))
        nodes[f"{name}_synapse"] = synapse_node(nir, layer.synapse, in_shape, name)
        edges.append((f"{name}_p", f"{name}_synapse"))
        u_src = f"{name}_synapse"
        k = pool_size(layer)
        comparison = ">=" if p.spike_at_zero else ">"
        if k > 1 and p.refractory == "before_pool":
            # every unpooled neuron spikes with its own refractory loop; the layer's spike is
            # the OR over each pool: a sum of 0/1 spikes above 1/2 (plain NIR, no metadata needed)
            neuron_shape = tuple(int(d) for d in layer.refractory_shape(tuple(in_shape)))
            spikes = _refractory_threshold(nir, nodes, edges, f"{name}_neurons", u_src, neuron_shape, p, dt, comparison)
            nodes[f"{name}_pool"] = nir.SumPool2d(
                kernel_size=np.array([k, k]), stride=np.array([k, k]), padding=np.array([0, 0]),
                metadata={ROLE_KEY: "or_pool"},
            )
            nodes[f"{name}_spike"] = nir.Threshold(
                threshold=filled(out_shape, 0.5), metadata={ROLE_KEY: "spike", "comparison": comparison}
            )
            edges += [(spikes, f"{name}_pool"), (f"{name}_pool", f"{name}_spike")]
            spikes = f"{name}_spike"
        else:
            if k > 1:
                nodes[f"{name}_pool"] = nir.SumPool2d(
                    kernel_size=np.array([k, k]), stride=np.array([k, k]), padding=np.array([0, 0]),
                    metadata={POOL_KEY: "max", ROLE_KEY: "max_pool"},
                )
                edges.append((u_src, f"{name}_pool"))
                u_src = f"{name}_pool"
            spikes = _refractory_threshold(nir, nodes, edges, name, u_src, out_shape, p, dt, comparison)
        if include_readouts:
            _readout_nodes(nir, nodes, edges, i, spikes, out_shape, readout)
        prev, prev_shape = spikes, out_shape
    nodes["output"] = nir.Output(output_type={"output": np.array(prev_shape)})
    edges.append((prev, "output"))
    return nodes, edges, []


def _refractory_threshold(nir, nodes, edges, name, u_src, shape, p: DecolleParams, dt, comparison) -> str:
    """Threshold (0) of ``u_src`` with the refractory loop LI (R) -> Scale (-rho) back into it;
    returns the Threshold's key."""
    nodes[f"{name}_spike"] = nir.Threshold(
        threshold=filled(shape, 0.0), metadata={ROLE_KEY: "spike", "comparison": comparison}
    )
    nodes[f"{name}_refractory"] = nir.LI(
        tau=filled(shape, time_constant(dt, p.gamma, "gamma")), r=filled(shape, 1.0),
        v_leak=filled(shape, 0.0), metadata={ROLE_KEY: "refractory_trace", "decay": float(p.gamma)},
    )
    nodes[f"{name}_rho"] = nir.Scale(scale=filled(shape, -float(p.rho)),
                                     metadata={ROLE_KEY: "refractory_strength"})
    edges += [
        (u_src, f"{name}_spike"),
        (f"{name}_spike", f"{name}_refractory"),
        (f"{name}_refractory", f"{name}_rho"),
        (f"{name}_rho", f"{name}_spike"),
    ]
    return f"{name}_spike"


def _readout_nodes(nir, nodes, edges, i, spikes, out_shape, readout: LocalReadout) -> None:
    """The fixed readout Y = G S (+ b) of the layer at position ``i``: [Flatten] -> Affine ->
    its own Output."""
    src, name = spikes, layer_name(i)
    if len(out_shape) > 1:
        nodes[f"{name}_readout_flatten"] = nir.Flatten(
            input_type={"input": np.array(out_shape)}, start_dim=0, end_dim=-1
        )
        edges.append((src, f"{name}_readout_flatten"))
        src = f"{name}_readout_flatten"
    g = as_float32(readout.g)
    bias = np.zeros(g.shape[0], dtype=np.float32) if readout.bias is None else as_float32(readout.bias)
    nodes[f"{name}_readout"] = nir.Affine(weight=g, bias=bias, metadata={ROLE_KEY: "readout"})
    nodes[readout_name(i)] = nir.Output(output_type={"output": np.array([g.shape[0]])})
    edges += [(src, f"{name}_readout"), (f"{name}_readout", readout_name(i))]
