"""Portable mode: only nodes that Norse and snnTorch import, and an exact computation wherever
one exists; and what keeps those importers from running a graph (:func:`importer_problems`).

Both run NIR graphs one step at a time (through nirtorch), summing a node's inputs and giving
an edge that closes a loop the previous step's value. So a ``Linear``/1 x 1 ``Conv2d`` with a
loop onto itself is a linear recurrence (our traces), and a ``LIF`` whose ``tau`` is the
importer's own step has no memory, i.e. it is a threshold. Per layer::

    traces_in -> traces (self-loop: Q, P) -> trace_p -> Affine | Conv2d (W, b)
      -> membrane_in -> membrane (self-loop: U, -rho R) -> membrane_out -> LIF (v_th 0)
      -> [SumPool2d -> LIF (v_th 1/2): the OR of a pool] -> next layer
    LIF spikes -> refractory -> membrane (loop edge)

and the last layer's readout ``Affine``/``Conv2d`` (G, bias) -> ``output``: the imported module
returns class scores. The only difference between the dialects is the ``LIF`` step: Norse
integrates with the ``dt`` its caller gives (``tau = dt``), snnTorch with a fixed 1e-4 s
(``tau = 1e-4``). What NIR cannot express for them (a refractory trace after a max pool,
``U >= 0``) is approximated, and :func:`portable_nodes` returns a note on each. The synapse
metadata keeps the layer's parameters, so :func:`threefactor.nir.from_nir` restores the
original network from a portable graph too.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..errors import NIRError
from ..model.layers import DecolleLayer
from ..model.network import DecolleNetwork
from ..model.neurons import DecolleParams
from .graph import ROLE_KEY, import_nir, layer_list, layer_name
from .nodes import as_float32, filled, pool_size, synapse_node

if TYPE_CHECKING:  # pragma: no cover
    import nir

__all__ = ["IMPORTER_NAMES", "IMPORTER_STEP", "DIALECT_NOTES", "importer_problems", "portable_nodes"]

# --- what the importers take ---------------------------------------------------------------
# Norse 1.1.0 (norse.torch.from_nir) and snnTorch 1.0.0 (snntorch.import_nir.import_from_nir),
# both through nirtorch 2.6, read from their source. A node type outside these Norse drops
# without a word (its output is missing downstream), snnTorch refuses with "Unknown node type".
IMPORTER_NAMES = {"norse": "Norse's from_nir", "snntorch": "snnTorch's import_from_nir"}
_IMPORTER_NODES = {
    "norse": ("Input", "Output", "Affine", "Linear", "Conv2d", "Flatten", "IF", "LIF", "CubaLIF",
              "SumPool2d"),
    "snntorch": ("Input", "Output", "Affine", "Linear", "Conv2d", "Flatten", "IF", "LIF", "CubaLIF",
                 "AvgPool2d", "SumPool2d"),
}


def importer_problems(graph: "nir.NIRGraph", importer: str) -> list[str]:
    """What keeps ``importer`` (``"norse"`` or ``"snntorch"``) from running ``graph`` as NIR
    means it, one phrase each; empty when nothing does."""
    nir = import_nir()
    if importer not in _IMPORTER_NODES:
        raise NIRError(f"importer must be one of {', '.join(_IMPORTER_NODES)}, got {importer!r}")
    problems: list[str] = []
    unknown = sorted({type(n).__name__ for n in graph.nodes.values()} - set(_IMPORTER_NODES[importer]))
    if unknown:
        how = "drops them without a word" if importer == "norse" else "refuses them"
        problems.append(f"it has no {', '.join(unknown)} nodes and {how}")
    outputs = [k for k, n in graph.nodes.items() if isinstance(n, nir.Output)]
    if len(outputs) > 1:
        problems.append(
            f"{len(outputs)} Output nodes: "
            + ("Norse's executor returns only one of them" if importer == "norse"
               else "nirtorch's nir_to_torch never returns on more than one")
        )
    for key, node in graph.nodes.items():
        if isinstance(node, nir.Conv2d) and int(node.groups) != 1:
            problems.append(f"{key!r} is a grouped Conv2d, which it builds with the wrong channels")
        if isinstance(node, nir.Flatten) and int(node.start_dim) == 0:
            problems.append(f"{key!r} flattens from dimension 0, which it applies to the batch axis too")
        if importer == "snntorch" and isinstance(node, (nir.LIF, nir.CubaLIF)):
            if np.unique(np.asarray(node.v_threshold)).size > 1:
                problems.append(f"{key!r} has thresholds that differ between neurons (it takes one per node)")
    return problems


# The step with which each importer integrates a LIF node: Norse takes it from its caller
# (norse.torch.from_nir(graph, dt=...)), snnTorch's import_from_nir fixes it at 1e-4 s.
IMPORTER_STEP: dict[str, float | None] = {"norse": None, "snntorch": 1e-4}

DIALECT_NOTES = {
    "norse": (
        "for norse.torch.from_nir(graph, dt=metadata dt): executors that run one step at a time "
        "and give a loop edge the previous step's value (nirtorch); LIF nodes with tau = dt are "
        "forward-Euler steps with no memory, v = r*in, spiking on v > v_threshold"
    ),
    "snntorch": (
        "for snntorch.import_nir.import_from_nir(graph), which integrates every LIF node with "
        "dt = 1e-4 s: LIF nodes with tau = 1e-4 s have no memory (beta = 1 - 1e-4/tau = 0), "
        "v = r*in, spiking on v > v_threshold; loop edges carry the previous step's value"
    ),
}


class _GraphBuilder:
    """Nodes and edges in insertion order (Norse's executor runs nodes in depth-first order
    of the edges, so a layer's side branches are added before its way on)."""

    def __init__(self) -> None:
        self.nodes: dict[str, Any] = {}
        self.edges: list[tuple[str, str]] = []

    def add(self, name: str, node: Any, *inputs: str) -> str:
        self.nodes[name] = node
        self.edges += [(src, name) for src in inputs]
        return name


def _channel_map(nir, shape: tuple[int, ...], matrix: np.ndarray, meta: dict):
    """x -> (matrix kron I) x: each block of channels (units) a multiple of another, as a
    Linear for vectors and a 1 x 1 Conv2d for maps (the importers build grouped convolutions
    with the wrong channels, so blocks are whole matrices)."""
    w = np.kron(np.asarray(matrix, dtype=np.float64), np.eye(shape[0])).astype(np.float32)
    if len(shape) == 1:
        return nir.Linear(weight=w, metadata=meta)
    return nir.Conv2d(input_shape=tuple(shape[1:]), weight=w[:, :, None, None], stride=(1, 1),
                      padding=(0, 0), dilation=(1, 1), groups=1,
                      bias=np.zeros(w.shape[0], np.float32), metadata=meta)


def _input_traces(nir, b: _GraphBuilder, name: str, src: str, shape, p: DecolleParams) -> str:
    """The traces (Q, P) of the input ``src`` as one node with a loop onto itself, which per
    step computes z = A (u + z_previous) = A z_previous + A u: with u = A^-1 b x that is the
    traces' own update z = A z_previous + b x, in either ordering, exactly (no delay on a
    forward edge is needed for the lagged one). The node before it makes u, the one after
    it picks P."""
    a, be = p.alpha, p.beta
    if p.ordering == "current":  # Q' = be Q + (1-be) x;  P' = a P + (1-a) Q'
        A = np.array([[be, 0.0], [(1 - a) * be, a]])
        bx = np.array([[1 - be], [(1 - a) * (1 - be)]])
    else:  # lagged: P' = a P + (1-a) Q, with the Q before this step's update
        A = np.array([[be, 0.0], [1 - a, a]])
        bx = np.array([[1 - be], [0.0]])
    meta = {ROLE_KEY: "input_traces", "alpha": float(a), "beta": float(be), "ordering": p.ordering}
    u = b.add(f"{name}_traces_in", _channel_map(nir, shape, np.linalg.solve(A, bx), {ROLE_KEY: "input_traces_in"}), src)
    z = b.add(f"{name}_traces", _channel_map(nir, shape, A, meta), u, f"{name}_traces")
    return b.add(f"{name}_trace_p", _channel_map(nir, shape, np.array([[0.0, 1.0]]), {ROLE_KEY: "membrane_trace"}), z)


def _membrane(nir, b: _GraphBuilder, name: str, syn: str, shape, p: DecolleParams) -> str:
    """U = W P + b - rho R into the neurons, with R fed back from their spikes: one node with
    a loop onto itself holds (U, -rho R, 0) and computes z = M (u + z_previous) with
    M = [[0, 0, 1], [0, gamma, 0], [0, 0, 0]]: the synapse's output enters the always-zero
    slot, so it passes at once, and the spikes enter the refractory slot through a loop edge
    (the previous step's value), scaled so that it holds -rho R after
    R' = gamma R + (1 - gamma) S. Every node of the loop that the importers run before its
    input exists then only adds a zero to an input that does (nirtorch builds an unknown loop
    input as a one-element zero). Returns the node that gives U."""
    if p.rho == 0.0:
        return syn
    if p.gamma == 0.0:
        raise NIRError(f"{name}: portable mode needs 0 < gamma < 1 when rho != 0")
    state = f"{name}_membrane"
    u = b.add(f"{name}_membrane_in", _channel_map(nir, shape, np.array([[0.0], [0.0], [1.0]]), {ROLE_KEY: "membrane_in"}), syn)
    m = np.array([[0.0, 0.0, 1.0], [0.0, p.gamma, 0.0], [0.0, 0.0, 0.0]])
    b.add(state, _channel_map(nir, shape, m, {ROLE_KEY: "membrane", "gamma": float(p.gamma), "rho": float(p.rho)}), u, state)
    return b.add(f"{name}_membrane_out", _channel_map(nir, shape, np.array([[1.0, 1.0, 0.0]]), {ROLE_KEY: "membrane_out"}), state)


def _refractory_feedback(nir, b: _GraphBuilder, name: str, neurons: str, shape, p: DecolleParams) -> None:
    """The spikes of ``neurons`` into the refractory slot of the membrane node (see _membrane)."""
    if p.rho == 0.0:
        return
    w = -p.rho * (1.0 - p.gamma) / p.gamma
    fb = b.add(f"{name}_refractory", _channel_map(nir, shape, np.array([[0.0], [w], [0.0]]), {ROLE_KEY: "refractory_strength"}), neurons)
    b.edges.append((fb, f"{name}_membrane"))


def _dense_as_conv(nir, weight: np.ndarray, bias: np.ndarray, in_shape, meta: dict):
    """W (out, C*H*W) on a (C, H, W) map as a Conv2d whose kernel covers the map: its output
    (out, 1, 1) needs no Flatten, which Norse and snnTorch build without a batch axis."""
    c, h, w = in_shape
    return nir.Conv2d(input_shape=(h, w), weight=weight.reshape(weight.shape[0], c, h, w),
                      stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, bias=bias,
                      metadata={**meta, "dense": True})


def _portable_synapse(nir, syn: nn.Module, in_shape, name: str, meta: dict):
    if isinstance(syn, nn.Linear) and len(in_shape) == 3:
        return _dense_as_conv(nir, as_float32(syn.weight), as_float32(syn.bias), in_shape, meta)
    node = synapse_node(nir, syn, in_shape, name)
    node.metadata.update(meta)
    return node


def _lif_threshold(nir, shape, v_th: float, tau: float, meta: dict):
    """A LIF node with no memory at the importer's step: the spike of its input above v_th."""
    return nir.LIF(tau=filled(shape, tau), r=filled(shape, 1.0), v_leak=filled(shape, 0.0),
                   v_threshold=filled(shape, v_th), v_reset=filled(shape, 0.0), metadata=meta)


def _layer_meta(layer: DecolleLayer) -> dict:
    p = layer.params
    return {"alpha": float(p.alpha), "beta": float(p.beta), "gamma": float(p.gamma),
            "rho": float(p.rho), "ordering": p.ordering, "refractory": p.refractory,
            "spike_at_zero": bool(p.spike_at_zero), "pool": pool_size(layer)}


def portable_nodes(
    nir, network: DecolleNetwork, shape: tuple[int, ...], dt: float, dialect: str, include_readouts: bool
) -> tuple[dict[str, Any], list[tuple[str, str]], list[str]]:
    """Per layer (see the module docstring): the input traces as one node with a self-loop, the
    synapse with its bias, U with the refractory loop, memoryless LIF neurons, and for a pooled
    layer the OR of each pool (SumPool2d, then a LIF at 1/2). Returns the nodes, the edges and
    one note per approximation (empty where the graph is exact)."""
    b = _GraphBuilder()
    b.add("input", nir.Input(input_type={"input": np.array(shape)}))
    prev, x_shape = "input", tuple(shape)  # a dense layer after a map keeps the map's shape
    tau_th = IMPORTER_STEP[dialect] or dt
    after_pool, at_zero = [], []
    for i, layer in enumerate(network.layers):
        p, name, k = layer.params, layer_name(i), pool_size(layer)
        if not (0.0 < p.alpha < 1.0 and 0.0 < p.beta < 1.0 and 0.0 <= p.gamma < 1.0):
            raise NIRError(f"{layer_list([i])}: portable mode needs 0 < alpha, beta < 1 and 0 <= gamma < 1")
        if k > 1 and p.refractory == "after_pool":
            after_pool.append(i)
        if p.spike_at_zero:
            at_zero.append(i)
        src = _input_traces(nir, b, name, prev, x_shape, p)
        meta = {ROLE_KEY: "synapse", **_layer_meta(layer)}
        syn = b.add(f"{name}_synapse", _portable_synapse(nir, layer.synapse, x_shape, name, meta), src)
        if isinstance(layer.synapse, nn.Linear) and len(x_shape) == 3:
            neuron_shape = (layer.synapse.out_features, 1, 1)
        else:
            # a pooled layer's neurons are the unpooled map, each with its own refractory trace
            neuron_shape = _synapse_shape(layer, _flat_if_dense(layer, x_shape))
        neurons = f"{name}_neurons" if k > 1 else f"{name}_spike"
        u = _membrane(nir, b, name, syn, neuron_shape, p)
        b.add(neurons, _lif_threshold(nir, neuron_shape, 0.0, tau_th, {ROLE_KEY: "spike"}), u)
        _refractory_feedback(nir, b, name, neurons, neuron_shape, p)
        spikes, out_shape = neurons, neuron_shape
        if k > 1:  # the layer's spike is the OR of its pool: a sum of 0/1 spikes above 1/2
            pool = b.add(f"{name}_pool", nir.SumPool2d(
                kernel_size=np.array([k, k]), stride=np.array([k, k]), padding=np.array([0, 0]),
                metadata={ROLE_KEY: "or_pool"}), neurons)
            out_shape = (neuron_shape[0], neuron_shape[1] // k, neuron_shape[2] // k)
            spikes = b.add(f"{name}_spike", _lif_threshold(nir, out_shape, 0.5, tau_th, {ROLE_KEY: "or_spike"}), pool)
        prev, x_shape = spikes, out_shape
    if include_readouts:
        readout = network.readouts[-1]
        g = as_float32(readout.g)
        bias = np.zeros(g.shape[0], np.float32) if readout.bias is None else as_float32(readout.bias)
        meta = {ROLE_KEY: "readout"}
        node = (_dense_as_conv(nir, g, bias, x_shape, meta) if len(x_shape) == 3
                else nir.Affine(weight=g, bias=bias, metadata=meta))
        prev = b.add(f"{layer_name(len(network.layers) - 1)}_readout", node, prev)
        x_shape = (g.shape[0], 1, 1) if len(x_shape) == 3 else (g.shape[0],)
    b.add("output", nir.Output(output_type={"output": np.array(x_shape)}), prev)

    notes = []
    if after_pool:
        notes.append(
            f"the refractory trace after the max pool ({layer_list(after_pool)}) becomes one per "
            "unpooled neuron (refractory: before_pool), which NIR can express: NIR has no max "
            "pooling and no upsampling to subtract a pooled trace from every neuron of its pool"
        )
    if at_zero:
        notes.append(
            f"U >= 0 ({layer_list(at_zero)}) becomes U > 0, the only comparison of a LIF node "
            "(they differ only where U is exactly 0)"
        )
    return b.nodes, b.edges, notes


def _synapse_shape(layer: DecolleLayer, shape) -> tuple[int, ...]:
    w = layer.synapse.weight
    with torch.no_grad():
        out = layer.synapse(torch.zeros((1, *shape), dtype=w.dtype, device=w.device))
    return tuple(int(d) for d in out.shape[1:])


def _flat_if_dense(layer: DecolleLayer, shape):
    if isinstance(layer.synapse, nn.Linear) and len(shape) > 1:
        return (math.prod(shape),)
    return tuple(shape)
