"""Read a NIR graph written by :func:`threefactor.nir.export_nir` back into a
:class:`DecolleNetwork` (:func:`from_nir`).

The reader follows the graph's edges from its Input, one DECOLLE layer after another, and
never its node names: exact graphs are read by their structure, portable ones by the
threefactor metadata on each synapse. So graphs whose names number the layers from 0 (format
version 1) read as they always did.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..errors import NIRError
from ..model.layers import DecolleLayer, LocalReadout
from ..model.network import DecolleNetwork
from ..model.neurons import ORDERINGS, REFRACTORY_PLACEMENTS, DecolleParams
from ..model.surrogates import SURROGATES
from .graph import FORMAT, POOL_KEY, ROLE_KEY, import_nir, meta_value, read_graph

if TYPE_CHECKING:  # pragma: no cover
    import nir

__all__ = ["from_nir"]


def _uniform(arr: Any, what: str, where: str) -> float:
    a = np.asarray(arr, dtype=np.float64)
    if a.size == 0:
        raise NIRError(f"{where}: {what} is empty")
    if not np.all(a == a.flat[0]):
        raise NIRError(f"{where}: {what} differs between neurons, which a DECOLLE layer cannot hold")
    return float(a.flat[0])


class _Graph:
    """Successor and predecessor lists of a NIR graph, for walking its layers."""

    def __init__(self, graph, label: str):
        self.g, self.label = graph, label
        self.succ: dict[str, list[str]] = {k: [] for k in graph.nodes}
        self.pred: dict[str, list[str]] = {k: [] for k in graph.nodes}
        for a, b in graph.edges:
            if a not in graph.nodes or b not in graph.nodes:
                raise NIRError(f"{label}: edge ({a!r}, {b!r}) names a node that is not in the graph")
            self.succ[a].append(b)
            self.pred[b].append(a)

    def node(self, key: str):
        return self.g.nodes[key]

    def err(self, key: str, problem: str) -> NIRError:
        return NIRError(f"{self.label}: node {key!r} ({type(self.node(key)).__name__}) {problem}")

    def only_pred(self, key: str) -> None:
        """``key`` has one input besides a loop onto itself (a portable graph's trace)."""
        n = len([p for p in self.pred[key] if p != key])
        if n != 1:
            raise self.err(key, f"has {n} inputs where a DECOLLE layer has 1")


def from_nir(
    source: "str | Path | nir.NIRGraph", dt: float | None = None, surrogate: str | None = None
) -> DecolleNetwork:
    """A :class:`DecolleNetwork` for inference from a NIR file or graph made by
    :func:`threefactor.nir.export_nir`.

    Exact-mode graphs are read structurally (LI, [Delay], LI, Affine/Conv2d, [max pool],
    Threshold with the refractory loop LI -> Scale); portable graphs need the threefactor
    metadata that export_nir writes on each synapse, which restores what the portable graph
    approximates (ordering, refractory placement, ``U >= 0``). Node names are never read, so
    graphs of either layer numbering give the same network. ``dt`` (seconds) is needed only
    when the graph metadata has none. The network's readouts hold the exported ``G``; a layer
    whose readout the graph lacks (all of them without readouts, all but the last in a
    portable graph) gets a readout with 0 outputs. Raises :class:`NIRError` (a ``ValueError``)
    for files that are not NIR and graphs with nodes a DECOLLE network cannot hold.
    """
    nir = import_nir()
    graph, label = read_graph(source)
    meta = graph.metadata if isinstance(graph.metadata, dict) else {}
    fmt = meta_value(meta, "format")
    if fmt is not None and fmt != FORMAT:
        raise NIRError(f"{label}: metadata format {fmt!r} is not {FORMAT!r}")
    if dt is None:
        dt = meta_value(meta, "dt")
    if dt is None:
        raise NIRError(f"{label}: the graph metadata has no dt; pass dt (seconds per step) to from_nir")
    dt = float(dt)
    if surrogate is None:
        surrogate = meta_value(meta, "surrogate", "boxcar")
    if surrogate not in SURROGATES:
        surrogate = "boxcar"
    g = _Graph(graph, label)

    inputs = [k for k, n in graph.nodes.items() if isinstance(n, nir.Input)]
    if len(inputs) != 1:
        raise NIRError(f"{label}: has {len(inputs)} Input nodes; a DECOLLE network has exactly 1")
    supported = (nir.Input, nir.Output, nir.Flatten, nir.LI, nir.Delay, nir.Affine, nir.Linear,
                 nir.Conv2d, nir.SumPool2d, nir.AvgPool2d, nir.Threshold, nir.Scale, nir.LIF)
    for key, node in graph.nodes.items():
        if not isinstance(node, supported):
            raise g.err(key, "has no DECOLLE equivalent; from_nir reads graphs written by "
                             "threefactor's export_nir (exact or portable mode)")
    shape = tuple(int(s) for s in np.asarray(graph.nodes[inputs[0]].input_type["input"]).reshape(-1))

    layers: list[DecolleLayer] = []
    readouts: list[LocalReadout | None] = []
    cur, cur_shape = inputs[0], shape
    while True:
        nexts = [s for s in g.succ[cur] if not _is_side_branch(g, nir, cur, s)]
        if cur != inputs[0] and not nexts:
            break
        if len(nexts) != 1:
            raise g.err(cur, f"feeds {len(nexts)} layers; from_nir reads one chain of layers")
        layer, cur, cur_shape = _read_layer(g, nir, nexts[0], cur_shape, dt, meta, surrogate)
        layers.append(layer)
        readouts.append(_read_readout(g, nir, cur, cur_shape))
    if not layers:
        raise NIRError(f"{label}: the graph has no DECOLLE layer")
    final = [
        r if r is not None else LocalReadout(math.prod(_out_shape(layers, shape, i)), 0)
        for i, r in enumerate(readouts)
    ]
    network = DecolleNetwork(layers, final)
    network.eval()
    return network


def _out_shape(layers, shape, i):
    for layer in layers[: i + 1]:
        if isinstance(layer.synapse, nn.Linear) and len(shape) > 1:
            shape = (math.prod(shape),)
        shape = layer.output_shape(shape)
    return shape


def _is_side_branch(g: _Graph, nir, spikes: str, key: str) -> bool:
    """Whether ``key`` (a successor of a layer's output) is its refractory loop, a readout or an Output."""
    node = g.node(key)
    if isinstance(node, nir.Output) or _role(g, key) in ("refractory_strength", "readout"):
        return True
    if isinstance(node, nir.LI):
        # refractory trace: LI -> Scale -> back into the spiking node
        return any(isinstance(g.node(s), nir.Scale) and spikes in g.succ[s] for s in g.succ[key])
    if isinstance(node, nir.Flatten):
        return len(g.succ[key]) == 1 and _is_readout_affine(g, nir, g.succ[key][0])
    return _is_readout_affine(g, nir, key)


def _is_readout_affine(g: _Graph, nir, key: str) -> bool:
    node = g.node(key)
    dense = isinstance(node, nir.Affine) or (
        isinstance(node, nir.Conv2d) and meta_value(node.metadata or {}, "dense", False))
    return dense and len(g.succ[key]) > 0 and all(
        isinstance(g.node(s), nir.Output) for s in g.succ[key]
    )


def _read_readout(g: _Graph, nir, spikes: str, out_shape) -> LocalReadout | None:
    found = []
    for s in g.succ[spikes]:
        key = s
        if isinstance(g.node(s), nir.Flatten) and len(g.succ[s]) == 1:
            key = g.succ[s][0]
        if _is_readout_affine(g, nir, key):
            found.append(key)
    if not found:
        return None
    if len(found) > 1:
        raise g.err(spikes, f"feeds {len(found)} readouts; a DECOLLE layer has one")
    node = g.node(found[0])
    weight = np.asarray(node.weight, dtype=np.float32)
    weight = weight.reshape(weight.shape[0], -1)  # a Conv2d covering the map: (classes, C, H, W)
    n_in = math.prod(out_shape)
    if weight.ndim != 2 or weight.shape[1] != n_in:
        raise g.err(found[0], f"has weight shape {weight.shape}, not (classes, {n_in})")
    bias = np.asarray(node.bias, dtype=np.float32).reshape(-1)
    if bias.shape != (weight.shape[0],):
        raise g.err(found[0], f"has bias shape {bias.shape}, not ({weight.shape[0]},)")
    return LocalReadout.from_weights(torch.from_numpy(weight),
                                     torch.from_numpy(bias) if np.any(bias != 0) else None)


def _decay(g: _Graph, key: str, tau: Any, dt: float, what: str, exact: Any) -> float:
    tau = _uniform(tau, what, f"{g.label}: node {key!r}")
    if not tau > 0:
        raise g.err(key, f"has {what} = {tau}; it must be > 0")
    decay = 1.0 - dt / tau
    if not 0.0 <= decay < 1.0:
        raise g.err(key, f"has {what} = {tau:g} s, shorter than dt = {dt:g} s")
    if exact is not None:  # the exact decay written at export; tau = dt/(1-decay) rounds
        exact = float(exact)
        if abs(exact - decay) <= 1e-9 * max(1.0, abs(decay)) + 1e-12:
            return exact
    return decay


def _check_li(g: _Graph, key: str, node) -> None:
    if np.any(np.asarray(node.r) != 1.0):
        raise g.err(key, "has r != 1, which a DECOLLE trace cannot hold")
    if np.any(np.asarray(node.v_leak) != 0.0):
        raise g.err(key, "has v_leak != 0, which a DECOLLE trace cannot hold")


def _step(g: _Graph, key: str) -> str:
    if len(g.succ[key]) != 1:
        raise g.err(key, f"feeds {len(g.succ[key])} nodes where a DECOLLE layer continues with 1")
    return g.succ[key][0]


def _torch_synapse(g: _Graph, nir, key: str, node, in_shape) -> nn.Module:
    if isinstance(node, nir.Affine):
        w = np.asarray(node.weight, dtype=np.float32)
        if w.ndim != 2 or len(in_shape) != 1 or w.shape[1] != in_shape[0]:
            raise g.err(key, f"has weight shape {w.shape}, which does not take input {in_shape}")
        syn = nn.Linear(w.shape[1], w.shape[0])
    else:
        w = np.asarray(node.weight, dtype=np.float32)
        if w.ndim != 4 or len(in_shape) != 3:
            raise g.err(key, f"has weight shape {w.shape} for input {in_shape}; need (C, H, W) input")
        padding = node.padding
        if not isinstance(padding, str):
            padding = tuple(int(p) for p in np.asarray(padding).reshape(-1))
            padding = padding * 2 if len(padding) == 1 else padding
        stride = tuple(int(s) for s in np.broadcast_to(np.asarray(node.stride), (2,)))
        dilation = tuple(int(s) for s in np.broadcast_to(np.asarray(node.dilation), (2,)))
        syn = nn.Conv2d(
            w.shape[1] * int(node.groups), w.shape[0], tuple(w.shape[2:]), stride=stride,
            padding=padding, dilation=dilation, groups=int(node.groups),
        )
    with torch.no_grad():
        syn.weight.copy_(torch.from_numpy(w))
        syn.bias.copy_(torch.from_numpy(np.asarray(node.bias, dtype=np.float32).reshape(-1)))
    return syn


def _pool_kernel(g: _Graph, nir, key: str, node) -> int:
    k = np.asarray(node.kernel_size).reshape(-1)
    s = np.asarray(node.stride).reshape(-1)
    pad = np.asarray(node.padding).reshape(-1)
    if k.size == 0 or np.any(k != k[0]) or np.any(s != k[0]) or np.any(pad != 0):
        raise g.err(key, "is not a square pool with stride = kernel and no padding")
    return int(k[0])


def _read_layer(g: _Graph, nir, key: str, in_shape, dt: float, meta: dict, surrogate: str):
    """Parse one layer starting at ``key``; returns (layer, key of its spiking node, out shape)."""
    g.only_pred(key)
    node = g.node(key)
    if isinstance(node, nir.Flatten):
        if len(in_shape) > 1:
            in_shape = (math.prod(in_shape),)
        key = _step(g, key)
        g.only_pred(key)
        node = g.node(key)
    if isinstance(node, nir.LI):
        return _read_exact_layer(g, nir, key, in_shape, dt, surrogate)
    if isinstance(node, (nir.Affine, nir.Linear, nir.Conv2d)):
        return _read_portable_layer(g, nir, key, in_shape, surrogate)
    raise g.err(key, "cannot start a DECOLLE layer (expected LI, Linear, Affine or Conv2d)")


def _read_exact_layer(g: _Graph, nir, key: str, in_shape, dt: float, surrogate: str):
    q = g.node(key)
    _check_li(g, key, q)
    beta = _decay(g, key, q.tau, dt, "tau", q.metadata.get("decay"))
    key = _step(g, key)
    g.only_pred(key)
    ordering = "current"
    if isinstance(g.node(key), nir.Delay):
        lag = _uniform(g.node(key).delay, "delay", f"{g.label}: node {key!r}")
        if not math.isclose(lag, dt, rel_tol=1e-6):
            raise g.err(key, f"delays by {lag:g} s; only one step (dt = {dt:g} s) is supported")
        ordering = "lagged"
        key = _step(g, key)
        g.only_pred(key)
    p_node = g.node(key)
    if not isinstance(p_node, nir.LI):
        raise g.err(key, "follows the synaptic trace where the membrane trace (LI) belongs")
    _check_li(g, key, p_node)
    alpha = _decay(g, key, p_node.tau, dt, "tau", p_node.metadata.get("decay"))
    key = _step(g, key)
    g.only_pred(key)
    syn_node = g.node(key)
    if not isinstance(syn_node, (nir.Affine, nir.Conv2d)):
        raise g.err(key, "follows the membrane trace where the synapse (Affine or Conv2d) belongs")
    synapse = _torch_synapse(g, nir, key, syn_node, in_shape)
    key = _step(g, key)
    pool = 1
    if isinstance(g.node(key), (nir.SumPool2d, nir.AvgPool2d)):
        g.only_pred(key)
        if meta_value(g.node(key).metadata, POOL_KEY) != "max":
            raise g.err(key, f"is {type(g.node(key)).__name__} pooling; a DECOLLE layer pools "
                             f"only by max (metadata {POOL_KEY} = 'max')")
        pool = _pool_kernel(g, nir, key, g.node(key))
        key = _step(g, key)
    spike_key = key
    thr = g.node(spike_key)
    if not isinstance(thr, nir.Threshold):
        raise g.err(spike_key, "stands where the layer's Threshold belongs")
    comparison = meta_value(thr.metadata or {}, "comparison", ">=")
    if comparison not in (">=", ">"):
        raise g.err(spike_key, f"compares with {comparison!r}; expected '>=' or '>'")
    # the refractory loop: Threshold -> LI (R) -> Scale (-rho) -> Threshold
    loops = [s for s in g.succ[spike_key] if isinstance(g.node(s), nir.LI)
             and any(isinstance(g.node(t), nir.Scale) and spike_key in g.succ[t] for t in g.succ[s])]
    gamma, rho, s_key = 0.0, 0.0, None
    if len(loops) > 1:
        raise g.err(spike_key, "has more than one refractory loop")
    if loops:
        r_key = loops[0]
        r_node = g.node(r_key)
        _check_li(g, r_key, r_node)
        g.only_pred(r_key)
        gamma = _decay(g, r_key, r_node.tau, dt, "tau", r_node.metadata.get("decay"))
        s_key = _step(g, r_key)
        g.only_pred(s_key)
        rho = -_uniform(g.node(s_key).scale, "scale", f"{g.label}: node {s_key!r}")
    extra_in = [k for k in g.pred[spike_key] if k != s_key]
    if len(extra_in) != 1:
        raise g.err(spike_key, f"has {len(extra_in)} inputs besides the refractory loop; expected 1")
    neuron_key, out_key = spike_key, spike_key
    refractory = DecolleParams().refractory  # the same dynamics either way without a pool
    # a plain sum pool of the spikes (no max marker) followed by Threshold(1/2) is their OR
    or_pool = [k for k in g.succ[spike_key] if isinstance(g.node(k), nir.SumPool2d)
               and meta_value(g.node(k).metadata or {}, POOL_KEY) != "max"]
    if or_pool:  # neurons -> SumPool2d -> Threshold(1/2): the refractory trace is before the pool
        if pool > 1:
            raise g.err(or_pool[0], "pools a layer that is already max-pooled")
        pool = _pool_kernel(g, nir, or_pool[0], g.node(or_pool[0]))
        g.only_pred(or_pool[0])
        out_key = _step(g, or_pool[0])
        g.only_pred(out_key)
        if not isinstance(g.node(out_key), nir.Threshold):
            raise g.err(out_key, "follows the spike pool where the layer's Threshold belongs")
        if np.any(np.asarray(g.node(out_key).threshold) != 0.5):
            raise g.err(out_key, "is not the OR of its pool (threshold 1/2 on a sum of spikes)")
        refractory = "before_pool"
    elif pool > 1:
        refractory = "after_pool"
    params = DecolleParams(alpha=alpha, beta=beta, gamma=gamma, rho=rho, ordering=ordering,
                           refractory=refractory, spike_at_zero=comparison == ">=")
    layer = DecolleLayer(synapse, params, pool, surrogate)
    neuron_shape = tuple(layer.refractory_shape(tuple(in_shape)))
    out_shape = tuple(layer.output_shape(tuple(in_shape)))
    threshold = np.asarray(thr.threshold, dtype=np.float64)
    if threshold.shape != neuron_shape:
        raise g.err(neuron_key, f"has shape {threshold.shape}, but the layer's neurons are {neuron_shape}")
    _fold_threshold(g, neuron_key, layer, threshold)
    return layer, out_key, out_shape


def _fold_threshold(g: _Graph, key: str, layer: DecolleLayer, threshold: np.ndarray) -> None:
    """U >= t is U - t >= 0: fold a threshold that is constant per output unit/channel into the bias."""
    if not np.any(threshold != 0.0):
        return
    per = threshold.reshape(threshold.shape[0], -1)
    if (layer.pool is not None and layer.params.refractory != "before_pool") or np.any(per != per[:, :1]):
        raise g.err(key, "has a threshold that varies within a channel, which the bias cannot hold")
    with torch.no_grad():
        layer.synapse.bias.sub_(torch.from_numpy(per[:, 0]).to(layer.synapse.bias.dtype))


def _role(g: _Graph, key: str) -> str | None:
    return meta_value(g.node(key).metadata or {}, ROLE_KEY)


def _next(g: _Graph, key: str) -> str:
    """The one successor of ``key`` besides a loop onto itself."""
    succ = [s for s in g.succ[key] if s != key]
    if len(succ) != 1:
        raise g.err(key, f"feeds {len(succ)} nodes where a DECOLLE layer continues with 1")
    return succ[0]


_PORTABLE_TRACES = ("input_traces_in", "input_traces", "membrane_trace")
_LAYER_META = ("alpha", "beta", "gamma", "rho", "ordering", "refractory", "spike_at_zero", "pool")


def _read_portable_layer(g: _Graph, nir, key: str, in_shape, surrogate: str):
    """One layer of a portable graph: its parameters from the synapse's metadata, W and b from
    the synapse node itself, the pool from the OR construction."""
    while _role(g, key) in _PORTABLE_TRACES:
        key = _next(g, key)
    syn_key, syn_node = key, g.node(key)
    neurons_key = _next(g, syn_key)
    while _role(g, neurons_key) in ("membrane_in", "membrane", "membrane_out"):
        neurons_key = _next(g, neurons_key)
    nm = syn_node.metadata or {}
    if not isinstance(syn_node, (nir.Affine, nir.Conv2d)) or _role(g, key) != "synapse" \
            or any(k not in nm for k in _LAYER_META):
        raise g.err(key, "lacks the threefactor metadata (alpha, beta, gamma, rho, ordering, "
                         "refractory, spike_at_zero, pool) that restores a DECOLLE layer")
    ordering, refractory = meta_value(nm, "ordering"), meta_value(nm, "refractory")
    if ordering not in ORDERINGS:
        raise g.err(key, f"has ordering {ordering!r} in its metadata; valid: {', '.join(ORDERINGS)}")
    if refractory not in REFRACTORY_PLACEMENTS:
        raise g.err(key, f"has refractory {refractory!r} in its metadata; valid: {', '.join(REFRACTORY_PLACEMENTS)}")
    params = DecolleParams(
        alpha=float(meta_value(nm, "alpha")), beta=float(meta_value(nm, "beta")),
        gamma=float(meta_value(nm, "gamma")), rho=float(meta_value(nm, "rho")), ordering=ordering,
        refractory=refractory, spike_at_zero=bool(meta_value(nm, "spike_at_zero")),
    )
    if meta_value(nm, "dense", False):  # a dense layer written as a Conv2d covering its input map
        w = np.asarray(syn_node.weight, dtype=np.float32)
        synapse = nn.Linear(math.prod(w.shape[1:]), w.shape[0])
        with torch.no_grad():
            synapse.weight.copy_(torch.from_numpy(w.reshape(w.shape[0], -1)))
            synapse.bias.copy_(torch.from_numpy(np.asarray(syn_node.bias, dtype=np.float32).reshape(-1)))
        in_shape = (math.prod(in_shape),)
    else:
        if isinstance(syn_node, nir.Affine) and len(in_shape) > 1:
            in_shape = (math.prod(in_shape),)
        synapse = _torch_synapse(g, nir, key, syn_node, in_shape)
    pool = int(meta_value(nm, "pool"))
    layer = DecolleLayer(synapse, params, pool, surrogate)
    out_shape = tuple(layer.output_shape(tuple(in_shape)))
    key = neurons_key
    if not isinstance(g.node(key), nir.LIF):
        raise g.err(key, "stands where the layer's LIF neurons belong")
    if pool > 1:
        pools = [s for s in g.succ[key] if isinstance(g.node(s), nir.SumPool2d)]
        if len(pools) != 1 or _pool_kernel(g, nir, pools[0], g.node(pools[0])) != pool:
            raise g.err(key, f"does not feed the OR of {pool} x {pool} pools its metadata says")
        key = _next(g, pools[0])
        if not isinstance(g.node(key), nir.LIF):
            raise g.err(key, "follows the spike pool where the layer's LIF belongs")
    graph_shape = np.asarray(g.node(key).v_threshold).shape
    dense_map = len(out_shape) == 1 and graph_shape == (*out_shape, 1, 1)  # a dense layer as a Conv2d
    if graph_shape != out_shape and not dense_map:
        raise g.err(key, f"has shape {graph_shape}, but the layer's output is {out_shape}")
    return layer, key, out_shape
