"""Export DECOLLE networks to NIR (the Neuromorphic Intermediate Representation) and back.

Two modes (docs/nir.md has the mapping tables and the measurements):

``exact``
    Every term of our neuron as plain NIR nodes, so :func:`from_nir` gives back a network with
    identical spikes. Per layer::

        [Flatten] -> LI (Q, tau_syn) -> [Delay dt, lagged ordering] -> LI (P, tau_mem)
          -> Affine | Conv2d (W, b) -> [SumPool2d marked max] -> Threshold (0) -> next layer
                                                                  |   ^
                         LI (R, tau_ref) <------------------------+   |
                              +--> Scale (-rho) ----------------------+   (feedback edge)

    With the refractory trace before a max pool the layer's spike is the OR of its unpooled
    neurons' spikes: Threshold per neuron, then SumPool2d and Threshold(1/2), plain NIR. With
    it after the pool, NIR has no max pooling: the pool node is a ``SumPool2d`` whose metadata
    says ``{"threefactor_pool": "max"}``, which only threefactor (and the nirtorch node map of
    :mod:`threefactor.nir.check`) reads. A Threshold fires on ``U >= 0`` or ``U > 0``
    as its metadata ``comparison`` says.

``portable``
    Only nodes that Norse and snnTorch import, and an exact computation wherever one exists.
    Both run NIR graphs one step at a time (through nirtorch), summing a node's inputs and
    giving an edge that closes a loop the previous step's value. So a ``Linear``/1 x 1
    ``Conv2d`` with a loop onto itself is a linear recurrence (our traces), and a ``LIF`` whose
    ``tau`` is the importer's own step has no memory, i.e. it is a threshold. Per layer::

        traces_in -> traces (self-loop: Q, P) -> trace_p -> Affine | Conv2d (W, b)
          -> membrane_in -> membrane (self-loop: U, -rho R) -> membrane_out -> LIF (v_th 0)
          -> [SumPool2d -> LIF (v_th 1/2): the OR of a pool] -> next layer
        LIF spikes -> refractory -> membrane (loop edge)

    and the last layer's readout ``Affine``/``Conv2d`` (G, bias) -> ``output``: the imported
    module returns class scores. The only difference between the dialects is the ``LIF`` step:
    Norse integrates with the ``dt`` its caller gives (``tau = dt``), snnTorch with a fixed
    1e-4 s (``tau = 1e-4``). What NIR cannot express for them (a refractory trace after a max
    pool, ``U >= 0``) is approximated, and a :class:`NIRApproximationWarning` lists it. The
    synapse metadata keeps the layer's parameters, so :func:`from_nir` restores the original
    network from a portable graph too.

Time: ``dt`` (seconds per step) is the run's own, ``data.dt_us``, in every time constant and
in the graph metadata; an explicit ``dt`` that differs is an override and warns.

Discretisation of exact graphs (written into the graph metadata): per time step, nodes are
evaluated in the order of the feed-forward edges; an ``LI`` node integrates with forward Euler,
``x <- x + dt/tau (v_leak - x + r * in)``, i.e. ``x <- d x + (1 - d) in`` with decay
``d = 1 - dt/tau`` (so ``tau = dt/(1 - d)``), and passes on its *updated* state; the
feedback edge ``Scale -> Threshold`` carries the value from the previous step; a ``Delay``
delays by one step.
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import torch
from torch import nn

from ..model.layers import DecolleLayer, LocalReadout
from ..model.network import DecolleNetwork
from ..model.neurons import ORDERINGS, REFRACTORY_PLACEMENTS, SURROGATES, DecolleParams
from ..errors import NIRError

if TYPE_CHECKING:  # pragma: no cover
    import nir

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MODES",
    "DIALECTS",
    "IMPORTER_STEP",
    "NIRDtWarning",
    "importer_problems",
    "NIRError",
    "NIRApproximationWarning",
    "export_nir",
    "from_nir",
    "add_export_arguments",
    "export_cli",
    "import_nir",
    "meta_value",
    "read_graph",
]

FORMAT = "threefactor-decolle"
FORMAT_VERSION = 1
MODES: tuple[str, ...] = ("exact", "portable")
DIALECTS: tuple[str, ...] = ("norse", "snntorch")
# seconds per step of a network object, which carries no dt of its own (a run's is data.dt_us)
DEFAULT_DT = 1e-3
POOL_KEY = "threefactor_pool"  # node metadata marking a pool node as max pooling
ROLE_KEY = "threefactor_role"  # node metadata naming the node's part of a DECOLLE layer
DISCRETISATION = (
    "per step, nodes are evaluated along the feed-forward edges; LI: forward Euler "
    "x <- x + dt/tau*(v_leak - x + r*in) = d*x + (1-d)*in with d = 1 - dt/tau, passing on the "
    "updated state; the feedback edge (Scale -> Threshold) carries the previous step's value; "
    "Delay: one step"
)


class NIRApproximationWarning(UserWarning):
    """Portable mode: the exported graph approximates the DECOLLE neuron."""


class NIRDtWarning(UserWarning):
    """An explicit dt that differs from the run's own (data.dt_us)."""


def import_nir():
    """The ``nir`` package, or NIRError in one sentence where it is not installed."""
    try:
        import nir
    except ImportError:  # pragma: no cover - nir is installed in the dev environment
        raise NIRError("NIR export needs the 'nir' package (pip install 'nir>=1.0,<2')") from None
    return nir


# ======================================================================================
# export
# ======================================================================================


def _resolve_source(
    source: Any, input_shape: Iterable[int] | None
) -> tuple[DecolleNetwork, tuple[int, ...] | None, dict[str, Any], float | None]:
    """Network, per-sample input shape (or None), extra metadata and the run's dt in seconds
    (None for a network object) of ``source``."""
    if isinstance(source, DecolleNetwork):
        return source, None if input_shape is None else tuple(int(s) for s in input_shape), {}, None
    if isinstance(source, (str, Path)):
        from ..errors import RunError
        from ..run.checkpoint import load_checkpoint

        try:
            network, cfg, payload = load_checkpoint(source)
        except RunError as err:
            raise NIRError(str(err)) from None
        shape = tuple(int(s) for s in (input_shape or payload["input_shape"]))
        extra = {"source": str(source), "epoch": int(payload.get("epoch", 0)),
                 "surrogate": cfg.network.surrogate}
        return network, shape, extra, cfg.data.dt_us * 1e-6
    raise NIRError(
        f"cannot export a {type(source).__name__}: pass a DecolleNetwork, a run directory or "
        "a checkpoint file"
    )


def _resolve_dt(dt: float | None, run_dt: float | None) -> tuple[float, str]:
    """The dt to export with and where it comes from; an explicit one that differs from the
    run's warns."""
    if dt is not None and not (isinstance(dt, (int, float)) and dt > 0 and math.isfinite(dt)):
        raise NIRError(f"dt must be a positive number of seconds, got {dt!r}")
    if run_dt is None:
        return (float(dt), "given") if dt is not None else (DEFAULT_DT, "default for a network object")
    if dt is None or math.isclose(dt, run_dt, rel_tol=1e-9):
        return run_dt, "the run's data.dt_us"
    warnings.warn(
        f"dt = {dt:g} s overrides the run's own {run_dt:g} s (data.dt_us = {run_dt * 1e6:g}): "
        f"every time constant in the graph is computed with {dt:g} s",
        NIRDtWarning, stacklevel=3,
    )
    return float(dt), "given, overriding the run's data.dt_us"


def _infer_input_shape(network: DecolleNetwork) -> tuple[int, ...]:
    first = network.layers[0].synapse
    if isinstance(first, nn.Linear):
        return (first.in_features,)
    raise NIRError(
        "input_shape (C, H, W) is needed to export a network whose first layer is "
        "convolutional"
    )


def _np32(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float32).numpy().copy()


def _full(shape: tuple[int, ...], value: float) -> np.ndarray:
    return np.full(shape, value, dtype=np.float64)


def _tau(dt: float, decay: float, what: str) -> float:
    if not 0.0 <= decay < 1.0:
        raise NIRError(f"{what} = {decay} cannot be written as a time constant (need 0 <= decay < 1)")
    return dt / (1.0 - decay)


def _synapse_node(nir, syn: nn.Module, in_shape: tuple[int, ...], with_bias: bool, name: str):
    """Affine or Conv2d of ``syn``; with ``with_bias=False`` (or no bias) the bias is zeros."""
    n_out = syn.weight.shape[0]
    bias = _np32(syn.bias) if with_bias and syn.bias is not None else np.zeros(n_out, np.float32)
    meta = {ROLE_KEY: "synapse"}
    if isinstance(syn, nn.Linear):
        return nir.Affine(weight=_np32(syn.weight), bias=bias, metadata=meta)
    if isinstance(syn, nn.Conv2d):
        if syn.padding_mode != "zeros":
            raise NIRError(f"{name}: padding mode {syn.padding_mode!r} has no NIR equivalent")
        padding = syn.padding if isinstance(syn.padding, str) else tuple(int(p) for p in syn.padding)
        return nir.Conv2d(
            input_shape=tuple(int(s) for s in in_shape[1:]),
            weight=_np32(syn.weight),
            stride=tuple(int(s) for s in syn.stride),
            padding=padding,
            dilation=tuple(int(d) for d in syn.dilation),
            groups=int(syn.groups),
            bias=bias,
            metadata=meta,
        )
    raise NIRError(f"{name}: synapse {type(syn).__name__} is neither nn.Linear nor nn.Conv2d")


def _pool_size(layer: DecolleLayer) -> int:
    if layer.pool is None:
        return 1
    k = layer.pool.kernel_size
    k = k if isinstance(k, int) else k[0]
    return int(k)


def _common(values: list[Any]) -> Any | None:
    return values[0] if all(v == values[0] for v in values) else None


def export_nir(
    source: str | Path | DecolleNetwork,
    out_path: str | Path | None = None,
    mode: str = "exact",
    dialect: str | None = None,
    include_readouts: bool = True,
    input_shape: Iterable[int] | None = None,
    dt: float | None = None,
) -> "nir.NIRGraph":
    """The NIR graph of a DECOLLE network, written to ``out_path`` when given.

    ``source`` is a :class:`DecolleNetwork`, a run directory or a ``checkpoint.pt`` file.
    ``mode`` is ``"exact"`` (reproduces our neuron node by node; read it back with
    :func:`from_nir`) or ``"portable"`` (for Norse and snnTorch, in the convention of
    ``dialect``: ``"norse"`` (default) or ``"snntorch"``; emits a
    :class:`NIRApproximationWarning` when it has to approximate). ``include_readouts`` adds the
    fixed readouts ``Y = G S`` (every layer's in exact mode, leading to outputs ``readout<i>``;
    the last layer's in portable mode, as the graph's one output). ``input_shape`` is one
    sample's input shape, needed for a network (not a checkpoint) whose first layer is
    convolutional. ``dt`` is seconds per time step: a run's own ``data.dt_us`` by default
    (an explicit value that differs warns with :class:`NIRDtWarning`), 1e-3 for a network
    object. A portable graph that its dialect's importer could not run raises
    :class:`NIRError` before anything is written.
    """
    nir = import_nir()
    if mode not in MODES:
        raise NIRError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "exact" and dialect is not None:
        raise NIRError(f"dialect {dialect!r} applies to portable mode only, not to exact mode")
    if mode == "portable":
        dialect = "norse" if dialect is None else dialect
        if dialect not in DIALECTS:
            raise NIRError(f"dialect must be one of {', '.join(DIALECTS)}, got {dialect!r}")
    network, shape, extra, run_dt = _resolve_source(source, input_shape)
    dt, dt_source = _resolve_dt(dt, run_dt)
    if len(network.layers) == 0:
        raise NIRError("the network has no layers to export")
    shape = shape or _infer_input_shape(network)
    try:
        _ = _shapes(network, shape)
    except RuntimeError as err:
        raise NIRError(f"input shape {shape} does not fit the network's first layer ({err})") from None

    if mode == "exact":
        nodes, edges, notes = _exact_nodes(nir, network, shape, dt, include_readouts)
    else:
        nodes, edges, notes = _portable_nodes(nir, network, shape, dt, dialect, include_readouts)

    params = [layer.params for layer in network.layers]
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "mode": mode,
        "dialect": dialect or "threefactor",
        "dt": float(dt),
        "dt_source": dt_source,
        "time_unit": "s",
        "discretisation": DISCRETISATION if mode == "exact" else _DIALECT_NOTES[dialect],
        "threshold_comparison": (_common([">=" if p.spike_at_zero else ">" for p in params]) or "mixed (see node metadata)")
                                if mode == "exact" else ">",
        "n_layers": len(network.layers),
        "input_shape": np.array(shape, dtype=np.int64),
        "readouts": bool(include_readouts),
        "surrogate": str(extra.get("surrogate", network.layers[0].surrogate)),
    }
    if mode == "portable":
        meta["importer_step"] = float(IMPORTER_STEP[dialect] or dt)
    ordering = _common([p.ordering for p in params])
    meta["ordering"] = ordering if ordering is not None else "mixed (see node metadata)"
    refractory = _common([p.refractory for p in params])
    meta["refractory"] = refractory if refractory is not None else "mixed (see node metadata)"
    for key in ("alpha", "beta", "gamma", "rho"):
        value = _common([float(getattr(p, key)) for p in params])
        if value is not None:
            meta[key] = value
    for key, decay in (("tau_mem", "alpha"), ("tau_syn", "beta"), ("tau_ref", "gamma")):
        if decay in meta:
            meta[key] = _tau(dt, meta[decay], decay)
    if notes:
        meta["approximations"] = "; ".join(notes)
    meta.update({k: v for k, v in extra.items() if k in ("source", "epoch")})

    graph = nir.NIRGraph(nodes=nodes, edges=edges, metadata=meta)
    if mode == "portable":
        problems = importer_problems(graph, dialect)
        if problems:
            raise NIRError(f"{_IMPORTER_NAMES[dialect]} could not run this graph: " + "; ".join(problems))
        if notes:
            warnings.warn(
                f"portable NIR export ({dialect} dialect) approximates the DECOLLE neuron: "
                + "; ".join(f"({i}) {n}" for i, n in enumerate(notes, 1)),
                NIRApproximationWarning,
                stacklevel=2,
            )
    if out_path is not None:
        out = Path(out_path)
        try:
            nir.write(out, graph)
        except OSError as err:
            raise NIRError(f"{out}: cannot write the NIR file ({err.strerror or err})") from None
    return graph


# --- what the importers take ---------------------------------------------------------------
# Norse 1.1.0 (norse.torch.from_nir) and snnTorch 1.0.0 (snntorch.import_nir.import_from_nir),
# both through nirtorch 2.6, read from their source. A node type outside these Norse drops
# without a word (its output is missing downstream), snnTorch refuses with "Unknown node type".
_IMPORTER_NAMES = {"norse": "Norse's from_nir", "snntorch": "snnTorch's import_from_nir"}
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


def _shapes(network: DecolleNetwork, shape: tuple[int, ...]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(input shape as the traces see it, output shape) of every layer, per sample."""
    out = []
    for layer in network.layers:
        if isinstance(layer.synapse, nn.Linear) and len(shape) > 1:
            shape = (math.prod(shape),)
        out_shape = layer.output_shape(shape)
        out.append((shape, tuple(int(s) for s in out_shape)))
        shape = out_shape
    return out


def _readout_nodes(nir, nodes, edges, i, spikes, out_shape, readout: LocalReadout) -> None:
    src = spikes
    if len(out_shape) > 1:
        nodes[f"layer{i}_readout_flatten"] = nir.Flatten(
            input_type={"input": np.array(out_shape)}, start_dim=0, end_dim=-1
        )
        edges.append((src, f"layer{i}_readout_flatten"))
        src = f"layer{i}_readout_flatten"
    g = _np32(readout.g)
    bias = np.zeros(g.shape[0], dtype=np.float32) if readout.bias is None else _np32(readout.bias)
    nodes[f"layer{i}_readout"] = nir.Affine(weight=g, bias=bias, metadata={ROLE_KEY: "readout"})
    nodes[f"readout{i}"] = nir.Output(output_type={"output": np.array([g.shape[0]])})
    edges += [(src, f"layer{i}_readout"), (f"layer{i}_readout", f"readout{i}")]


def _exact_nodes(nir, network, shape, dt, include_readouts):
    nodes: dict[str, Any] = {"input": nir.Input(input_type={"input": np.array(shape)})}
    edges: list[tuple[str, str]] = []
    prev, prev_shape = "input", shape
    layer_shapes = _shapes(network, shape)
    for i, (layer, readout) in enumerate(zip(network.layers, network.readouts)):
        p = layer.params
        in_shape, out_shape = layer_shapes[i]
        name = f"layer{i}"
        if tuple(in_shape) != tuple(prev_shape):
            nodes[f"{name}_flatten"] = nir.Flatten(
                input_type={"input": np.array(prev_shape)}, start_dim=0, end_dim=-1
            )
            edges.append((prev, f"{name}_flatten"))
            prev = f"{name}_flatten"
        zeros_in, ones_in = _full(in_shape, 0.0), _full(in_shape, 1.0)
        nodes[f"{name}_q"] = nir.LI(
            tau=_full(in_shape, _tau(dt, p.beta, "beta")), r=ones_in, v_leak=zeros_in,
            metadata={ROLE_KEY: "synaptic_trace", "decay": float(p.beta)},
        )
        nodes[f"{name}_p"] = nir.LI(
            tau=_full(in_shape, _tau(dt, p.alpha, "alpha")), r=ones_in.copy(),
            v_leak=zeros_in.copy(), metadata={ROLE_KEY: "membrane_trace", "decay": float(p.alpha)},
        )
        edges.append((prev, f"{name}_q"))
        if p.ordering == "lagged":
            nodes[f"{name}_lag"] = nir.Delay(delay=_full(in_shape, dt), metadata={ROLE_KEY: "lag"})
            edges += [(f"{name}_q", f"{name}_lag"), (f"{name}_lag", f"{name}_p")]
        else:
            edges.append((f"{name}_q", f"{name}_p"))
        nodes[f"{name}_synapse"] = _synapse_node(nir, layer.synapse, in_shape, True, name)
        edges.append((f"{name}_p", f"{name}_synapse"))
        u_src = f"{name}_synapse"
        k = _pool_size(layer)
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
                threshold=_full(out_shape, 0.5), metadata={ROLE_KEY: "spike", "comparison": comparison}
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
        threshold=_full(shape, 0.0), metadata={ROLE_KEY: "spike", "comparison": comparison}
    )
    nodes[f"{name}_refractory"] = nir.LI(
        tau=_full(shape, _tau(dt, p.gamma, "gamma")), r=_full(shape, 1.0),
        v_leak=_full(shape, 0.0), metadata={ROLE_KEY: "refractory_trace", "decay": float(p.gamma)},
    )
    nodes[f"{name}_rho"] = nir.Scale(scale=_full(shape, -float(p.rho)),
                                     metadata={ROLE_KEY: "refractory_strength"})
    edges += [
        (u_src, f"{name}_spike"),
        (f"{name}_spike", f"{name}_refractory"),
        (f"{name}_refractory", f"{name}_rho"),
        (f"{name}_rho", f"{name}_spike"),
    ]
    return f"{name}_spike"


# The step with which each importer integrates a LIF node: Norse takes it from its caller
# (norse.torch.from_nir(graph, dt=...)), snnTorch's import_from_nir fixes it at 1e-4 s.
IMPORTER_STEP: dict[str, float | None] = {"norse": None, "snntorch": 1e-4}

_DIALECT_NOTES = {
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
        return _dense_as_conv(nir, _np32(syn.weight), _np32(syn.bias), in_shape, meta)
    node = _synapse_node(nir, syn, in_shape, True, name)
    node.metadata.update(meta)
    return node


def _lif_threshold(nir, shape, v_th: float, tau: float, meta: dict):
    """A LIF node with no memory at the importer's step: the spike of its input above v_th."""
    return nir.LIF(tau=_full(shape, tau), r=_full(shape, 1.0), v_leak=_full(shape, 0.0),
                   v_threshold=_full(shape, v_th), v_reset=_full(shape, 0.0), metadata=meta)


def _layer_meta(layer: DecolleLayer) -> dict:
    p = layer.params
    return {"alpha": float(p.alpha), "beta": float(p.beta), "gamma": float(p.gamma),
            "rho": float(p.rho), "ordering": p.ordering, "refractory": p.refractory,
            "spike_at_zero": bool(p.spike_at_zero), "pool": _pool_size(layer)}


def _portable_nodes(nir, network, shape, dt, dialect, include_readouts):
    """Per layer (see the module docstring): the input traces as one node with a self-loop, the
    synapse with its bias, U with the refractory loop, memoryless LIF neurons, and for a pooled
    layer the OR of each pool (SumPool2d, then a LIF at 1/2)."""
    b = _GraphBuilder()
    b.add("input", nir.Input(input_type={"input": np.array(shape)}))
    prev, x_shape = "input", tuple(shape)  # a dense layer after a map keeps the map's shape
    tau_th = IMPORTER_STEP[dialect] or dt
    after_pool, at_zero = [], []
    for i, layer in enumerate(network.layers):
        p, name, k = layer.params, f"layer{i}", _pool_size(layer)
        if not (0.0 < p.alpha < 1.0 and 0.0 < p.beta < 1.0 and 0.0 <= p.gamma < 1.0):
            raise NIRError(f"layer {i}: portable mode needs 0 < alpha, beta < 1 and 0 <= gamma < 1")
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
        g = _np32(readout.g)
        bias = np.zeros(g.shape[0], np.float32) if readout.bias is None else _np32(readout.bias)
        meta = {ROLE_KEY: "readout"}
        node = (_dense_as_conv(nir, g, bias, x_shape, meta) if len(x_shape) == 3
                else nir.Affine(weight=g, bias=bias, metadata=meta))
        prev = b.add(f"layer{len(network.layers) - 1}_readout", node, prev)
        x_shape = (g.shape[0], 1, 1) if len(x_shape) == 3 else (g.shape[0],)
    b.add("output", nir.Output(output_type={"output": np.array(x_shape)}), prev)

    notes = []
    if after_pool:
        notes.append(
            f"the refractory trace after the max pool ({_layers(after_pool)}) becomes one per "
            "unpooled neuron (refractory: before_pool), which NIR can express: NIR has no max "
            "pooling and no upsampling to subtract a pooled trace from every neuron of its pool"
        )
    if at_zero:
        notes.append(
            f"U >= 0 ({_layers(at_zero)}) becomes U > 0, the only comparison of a LIF node "
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


def _layers(indices: list[int]) -> str:
    return ("layer " if len(indices) == 1 else "layers ") + ", ".join(map(str, indices))



# ======================================================================================
# import
# ======================================================================================


def _label(source: Any) -> str:
    return str(source) if isinstance(source, (str, Path)) else "NIR graph"


def read_graph(source: Any) -> tuple["nir.NIRGraph", str]:
    """(graph, label for messages) of a NIR file or graph; NIRError in one sentence otherwise."""
    nir = import_nir()
    if isinstance(source, nir.NIRGraph):
        return source, "NIR graph"
    if not isinstance(source, (str, Path)):
        raise NIRError(f"from_nir needs a path or a nir.NIRGraph, got a {type(source).__name__}")
    path = Path(source)
    if not path.is_file():
        raise NIRError(f"{path}: no such NIR file")
    try:
        graph = nir.read(path)
    except Exception as err:  # h5py, nir and numpy raise many types for foreign files
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise NIRError(f"{path}: not a readable NIR file ({type(err).__name__}: {detail[:120]})") from None
    if not isinstance(graph, nir.NIRGraph):
        raise NIRError(f"{path}: holds a single {type(graph).__name__} node, not a NIR graph")
    return graph, str(path)


def meta_value(meta: dict, key: str, default: Any = None) -> Any:
    """``meta[key]`` as a plain Python value (NIR files hand back bytes and 0-d arrays)."""
    v = meta.get(key, default)
    if isinstance(v, bytes):
        v = v.decode("utf8")
    if isinstance(v, np.ndarray) and v.shape == ():
        v = v.item()
    if isinstance(v, np.generic):
        v = v.item()
    return v


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
    """A :class:`DecolleNetwork` for inference from a NIR file or graph made by :func:`export_nir`.

    Exact-mode graphs are read structurally (LI, [Delay], LI, Affine/Conv2d, [max pool],
    Threshold with the refractory loop LI -> Scale); portable graphs need the threefactor
    metadata that :func:`export_nir` writes on each synapse, which restores what the portable
    graph approximates (ordering, refractory placement, ``U >= 0``). ``dt`` (seconds) is
    needed only when the graph metadata has none. The network's readouts hold the exported
    ``G``; a layer whose readout the graph lacks (all of them without readouts, all but the
    last in a portable graph) gets a readout with 0 outputs. Raises :class:`NIRError` (a ``ValueError``) for files that are
    not NIR and graphs with nodes a DECOLLE network cannot hold.
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


# ======================================================================================
# command line
# ======================================================================================


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of ``threefactor export`` (see :func:`export_cli`)."""
    parser.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT",
                        help="a run directory (holding checkpoint.pt) or a checkpoint file")
    parser.add_argument("out", metavar="OUT.nir", help="the NIR file to write")
    parser.add_argument("--mode", choices=MODES, default="exact",
                        help="exact: every term of the DECOLLE neuron as NIR nodes (read back with "
                             "from_nir, run by nirtorch); portable: for Norse and snnTorch "
                             "(default: exact)")
    parser.add_argument("--dialect", choices=DIALECTS, default=None,
                        help="portable mode: which importer's step the graph is for (default: norse)")
    parser.add_argument("--readouts", action=argparse.BooleanOptionalAction, default=True,
                        help="export the fixed readouts G, so that the graph gives class scores "
                             "(default: yes)")
    parser.add_argument("--dt", type=float, default=None,
                        help="seconds per time step, overriding the run's own data.dt_us "
                             "(warns when it differs)")
    parser.add_argument("--check", action="store_true",
                        help="then run the written graph with each installed importer on the "
                             "run's test split and print its accuracy next to ours")
    return parser


def export_cli(args: argparse.Namespace) -> int:
    """Run ``threefactor export``; warnings are printed as one line each."""
    import sys

    if args.mode == "exact" and args.dialect is not None:
        raise NIRError("--dialect applies to --mode portable only")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NIRApproximationWarning)
        warnings.simplefilter("always", NIRDtWarning)
        graph = export_nir(args.source, args.out, mode=args.mode, dialect=args.dialect,
                           include_readouts=args.readouts, dt=args.dt)
    for w in caught:
        print(f"threefactor: warning: {w.message}", file=sys.stderr)
    print(f"wrote {args.out}: {args.mode} mode, {len(graph.nodes)} nodes, "
          f"{int(graph.metadata['n_layers'])} layers, dt {graph.metadata['dt']:g} s "
          f"({graph.metadata['dt_source']})")
    if args.mode == "exact":
        print("note: Norse and snnTorch cannot import an exact graph (LI, Threshold, Scale, Delay); "
              "nirtorch runs it with threefactor.nir.nirtorch_node_map; --mode portable is for them")
    if args.check:
        from .check import check_nir, format_report

        print(format_report(check_nir(args.out, args.source)))
    return 0
