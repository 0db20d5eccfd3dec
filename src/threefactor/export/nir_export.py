"""Export DECOLLE networks to NIR (the Neuromorphic Intermediate Representation) and back.

Two modes (docs/nir.md has the mapping table):

``exact``
    Every term of our neuron as plain NIR nodes, so :func:`from_nir` gives back a network with
    identical spikes. Per layer::

        [Flatten] -> LI (Q, tau_syn) -> [Delay dt, lagged ordering] -> LI (P, tau_mem)
          -> Affine | Conv2d (W, b) -> [SumPool2d marked max] -> Threshold (0) -> next layer
                                                                  |   ^
                         LI (R, tau_ref) <------------------------+   |
                              +--> Scale (-rho) ----------------------+   (feedback edge)

    NIR has no max pooling: the pool node is a ``SumPool2d`` whose metadata says
    ``{"threefactor_pool": "max"}``; :func:`from_nir` reads it as max pooling, any other NIR
    consumer would sum. The threshold fires on ``U >= 0`` (NIR's ``Threshold`` says ``>``;
    the graph metadata records ``threshold_comparison = ">="``).

``portable``
    One ``CubaLIF`` per layer after its ``Affine``/``Conv2d``, in the convention of one
    importer (``dialect``): ``"norse"`` (Norse's ``from_nir``, dt = our dt) or ``"snntorch"``
    (snnTorch's ``import_from_nir``, which assumes dt = 1e-4 s). What CubaLIF cannot express
    (the refractory term, max pooling, the lagged ordering) is approximated, and a warning
    lists it. The graph metadata keeps enough to undo the approximations, so :func:`from_nir`
    restores the original network from a portable graph too.

Discretisation (written into the graph metadata): per time step, nodes are evaluated in the
order of the feed-forward edges; an ``LI`` node integrates with forward Euler,
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

from ..layers import DecolleLayer, LocalReadout
from ..network import DecolleNetwork
from ..neurons import ORDERINGS, SURROGATES, DecolleParams

if TYPE_CHECKING:  # pragma: no cover
    import nir

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MODES",
    "DIALECTS",
    "DIALECT_DT",
    "NIRError",
    "NIRApproximationWarning",
    "export_nir",
    "from_nir",
    "add_export_arguments",
    "export_cli",
]

FORMAT = "threefactor-decolle"
FORMAT_VERSION = 1
MODES: tuple[str, ...] = ("exact", "portable")
DIALECTS: tuple[str, ...] = ("norse", "snntorch")
DEFAULT_DT = 1e-3  # seconds: our time steps are 1 ms bins
# snnTorch's NIR importer hard-codes dt = 1e-4 s when it turns time constants into decays.
DIALECT_DT: dict[str, float | None] = {"norse": None, "snntorch": 1e-4}
POOL_KEY = "threefactor_pool"  # node metadata marking a pool node as max pooling
ROLE_KEY = "threefactor_role"  # node metadata naming the node's part of a DECOLLE layer
DISCRETISATION = (
    "per step, nodes are evaluated along the feed-forward edges; LI: forward Euler "
    "x <- x + dt/tau*(v_leak - x + r*in) = d*x + (1-d)*in with d = 1 - dt/tau, passing on the "
    "updated state; the feedback edge (Scale -> Threshold) carries the previous step's value; "
    "Delay: one step"
)


class NIRError(ValueError):
    """A graph, file or network that cannot be exported or imported, in one sentence."""


class NIRApproximationWarning(UserWarning):
    """Portable mode: the exported graph approximates the DECOLLE neuron."""


def _nir():
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
) -> tuple[DecolleNetwork, tuple[int, ...] | None, dict[str, Any]]:
    """Network, per-sample input shape (or None) and extra metadata for ``source``."""
    if isinstance(source, DecolleNetwork):
        return source, None if input_shape is None else tuple(int(s) for s in input_shape), {}
    if isinstance(source, (str, Path)):
        from ..train import RunError, load_checkpoint

        try:
            network, cfg, payload = load_checkpoint(source)
        except RunError as err:
            raise NIRError(str(err)) from None
        shape = tuple(int(s) for s in (input_shape or payload["input_shape"]))
        extra = {"source": str(source), "epoch": int(payload.get("epoch", 0)),
                 "surrogate": cfg.network.surrogate}
        return network, shape, extra
    raise NIRError(
        f"cannot export a {type(source).__name__}: pass a DecolleNetwork, a run directory or "
        "a checkpoint file"
    )


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
    dt: float = DEFAULT_DT,
) -> "nir.NIRGraph":
    """The NIR graph of a DECOLLE network, written to ``out_path`` when given.

    ``source`` is a :class:`DecolleNetwork`, a run directory or a ``checkpoint.pt`` file.
    ``mode`` is ``"exact"`` (reproduces our neuron; read it back with :func:`from_nir`) or
    ``"portable"`` (``CubaLIF`` nodes for other simulators, in the convention of ``dialect``:
    ``"norse"`` (default) or ``"snntorch"``; emits a :class:`NIRApproximationWarning`).
    ``include_readouts`` adds each layer's fixed readout ``Y = G S`` as an ``Affine``
    leading to an extra output ``readout<i>``. ``input_shape`` is one sample's input shape,
    needed for a network (not a checkpoint) whose first layer is convolutional. ``dt`` is
    the length of one time step in seconds.
    """
    nir = _nir()
    if mode not in MODES:
        raise NIRError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "exact" and dialect is not None:
        raise NIRError(f"dialect {dialect!r} applies to portable mode only, not to exact mode")
    if mode == "portable":
        dialect = "norse" if dialect is None else dialect
        if dialect not in DIALECTS:
            raise NIRError(f"dialect must be one of {', '.join(DIALECTS)}, got {dialect!r}")
    if not (isinstance(dt, (int, float)) and dt > 0 and math.isfinite(dt)):
        raise NIRError(f"dt must be a positive number of seconds, got {dt!r}")
    network, shape, extra = _resolve_source(source, input_shape)
    if len(network.layers) == 0:
        raise NIRError("the network has no layers to export")
    shape = shape or _infer_input_shape(network)
    try:
        _ = _shapes(network, shape)
    except RuntimeError as err:
        raise NIRError(f"input shape {shape} does not fit the network's first layer ({err})") from None

    if mode == "exact":
        nodes, edges, notes = _exact_nodes(nir, network, shape, dt, include_readouts)
        graph_dt = dt
    else:
        nodes, edges, notes = _portable_nodes(nir, network, shape, dt, dialect, include_readouts)
        graph_dt = DIALECT_DT[dialect] or dt

    params = [layer.params for layer in network.layers]
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "mode": mode,
        "dialect": dialect or "threefactor",
        "dt": float(graph_dt),
        "dt_model": float(dt),
        "time_unit": "s",
        "discretisation": DISCRETISATION if mode == "exact" else _DIALECT_NOTES[dialect],
        "threshold_comparison": ">=" if mode == "exact" else ">",
        "n_layers": len(network.layers),
        "input_shape": np.array(shape, dtype=np.int64),
        "readouts": bool(include_readouts),
        "surrogate": str(extra.get("surrogate", network.layers[0].surrogate)),
    }
    ordering = _common([p.ordering for p in params])
    meta["ordering"] = ordering if ordering is not None else "mixed (see node metadata)"
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
    nodes[f"layer{i}_readout"] = nir.Affine(
        weight=g, bias=np.zeros(g.shape[0], dtype=np.float32), metadata={ROLE_KEY: "readout"}
    )
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
        if k > 1:
            nodes[f"{name}_pool"] = nir.SumPool2d(
                kernel_size=np.array([k, k]), stride=np.array([k, k]), padding=np.array([0, 0]),
                metadata={POOL_KEY: "max", ROLE_KEY: "max_pool"},
            )
            edges.append((u_src, f"{name}_pool"))
            u_src = f"{name}_pool"
        zeros_out = _full(out_shape, 0.0)
        nodes[f"{name}_spike"] = nir.Threshold(
            threshold=zeros_out, metadata={ROLE_KEY: "spike", "comparison": ">="}
        )
        nodes[f"{name}_refractory"] = nir.LI(
            tau=_full(out_shape, _tau(dt, p.gamma, "gamma")), r=_full(out_shape, 1.0),
            v_leak=zeros_out.copy(), metadata={ROLE_KEY: "refractory_trace", "decay": float(p.gamma)},
        )
        nodes[f"{name}_rho"] = nir.Scale(scale=_full(out_shape, -float(p.rho)),
                                         metadata={ROLE_KEY: "refractory_strength"})
        edges += [
            (u_src, f"{name}_spike"),
            (f"{name}_spike", f"{name}_refractory"),
            (f"{name}_refractory", f"{name}_rho"),
            (f"{name}_rho", f"{name}_spike"),
        ]
        if include_readouts:
            _readout_nodes(nir, nodes, edges, i, f"{name}_spike", out_shape, readout)
        prev, prev_shape = f"{name}_spike", out_shape
    nodes["output"] = nir.Output(output_type={"output": np.array(prev_shape)})
    edges.append((prev, "output"))
    return nodes, edges, []


_DIALECT_NOTES = {
    "norse": (
        "Norse convention (norse.torch.from_nir(graph, dt=metadata dt)): CubaLIF with "
        "tau_syn = dt/(1-beta), tau_mem = dt/(1-alpha), r = 1, v_leak = 0; i <- beta*i + "
        "(1-beta)*w_in*x, v <- alpha*v + (1-alpha)*r*i (updated i), spike on v > v_threshold"
    ),
    "snntorch": (
        "snnTorch convention (snntorch.import_nir.import_from_nir, which assumes dt = 1e-4 s): "
        "CubaLIF with tau_syn = 1e-4/(1-beta), tau_mem = 1e-4/(1-alpha), r = tau_mem/1e-4, "
        "w_in = tau_syn/1e-4, v_leak = 0, so syn <- beta*syn + x, mem <- alpha*mem + syn "
        "(snn.Synaptic); mem = (W P + b)/((1-alpha)(1-beta)), spike on mem > 0"
    ),
}


def _portable_nodes(nir, network, shape, dt, dialect, include_readouts):
    nodes: dict[str, Any] = {"input": nir.Input(input_type={"input": np.array(shape)})}
    edges: list[tuple[str, str]] = []
    prev, prev_shape = "input", shape
    layer_shapes = _shapes(network, shape)
    ndt = DIALECT_DT[dialect] or dt
    pooled, lagged = [], []
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
        bias_in_threshold = dialect == "norse"
        nodes[f"{name}_synapse"] = _synapse_node(nir, layer.synapse, in_shape, not bias_in_threshold, name)
        edges.append((prev, f"{name}_synapse"))
        src = f"{name}_synapse"
        k = _pool_size(layer)
        w_in_pool = 1.0
        if k > 1:
            pooled.append(i)
            pool_cls = nir.SumPool2d if dialect == "norse" else nir.AvgPool2d
            nodes[f"{name}_pool"] = pool_cls(
                kernel_size=np.array([k, k]), stride=np.array([k, k]), padding=np.array([0, 0]),
                metadata={POOL_KEY: "max", ROLE_KEY: "pool_approximating_max"},
            )
            edges.append((src, f"{name}_pool"))
            src = f"{name}_pool"
            if dialect == "norse":
                w_in_pool = 1.0 / (k * k)  # sum pooling / k^2 = average pooling
        if p.ordering == "lagged":
            lagged.append(i)
        tau_syn = _tau(ndt, p.beta, "beta")
        tau_mem = _tau(ndt, p.alpha, "alpha")
        syn_bias = layer.synapse.bias
        bias = (torch.zeros(layer.synapse.weight.shape[0]) if syn_bias is None else syn_bias).detach().cpu().double()
        if bias_in_threshold:
            v_th = -bias.reshape((-1,) + (1,) * (len(out_shape) - 1)).expand(out_shape).numpy().copy()
            r, w_in = 1.0, w_in_pool
        else:
            v_th = _full(out_shape, 0.0)
            r, w_in = tau_mem / ndt, tau_syn / ndt
        nodes[f"{name}_neuron"] = nir.CubaLIF(
            tau_syn=_full(out_shape, tau_syn), tau_mem=_full(out_shape, tau_mem),
            r=_full(out_shape, r), v_leak=_full(out_shape, 0.0), v_threshold=v_th,
            v_reset=_full(out_shape, 0.0), w_in=_full(out_shape, w_in),
            metadata={
                ROLE_KEY: "decolle_neuron", "alpha": float(p.alpha), "beta": float(p.beta),
                "gamma": float(p.gamma), "rho": float(p.rho), "ordering": p.ordering,
                "bias_in": "v_threshold" if bias_in_threshold else "synapse",
            },
        )
        edges.append((src, f"{name}_neuron"))
        if include_readouts:
            _readout_nodes(nir, nodes, edges, i, f"{name}_neuron", out_shape, readout)
        prev, prev_shape = f"{name}_neuron", out_shape
    nodes["output"] = nir.Output(output_type={"output": np.array(prev_shape)})
    edges.append((prev, "output"))

    p0 = network.layers[0].params
    notes = [
        f"the refractory term -rho*R (rho = {p0.rho:g}, gamma = {p0.gamma:g}) has no CubaLIF "
        "equivalent: each spike instead resets the CubaLIF membrane to v_reset = 0"
    ]
    if pooled:
        how = "sum pooling with w_in = 1/k^2" if dialect == "norse" else "average pooling"
        notes.append(
            f"max pooling of the membrane ({_layers(pooled)}) becomes {how} of the synaptic "
            "current"
        )
    if dialect == "norse":
        notes.append(
            "the bias is moved into v_threshold = -b (exact, but per-neuron thresholds; the "
            "Affine/Conv2d bias is 0)"
        )
        notes.append("the threshold U >= 0 becomes v > v_threshold = -b (strict)")
    else:
        notes.append(
            "the bias stays in the Affine/Conv2d, so it passes through both CubaLIF filters and "
            "starts from 0 instead of acting at once"
        )
        notes.append(
            "the threshold U >= 0 becomes mem > 0 (strict), with mem = U/((1-alpha)(1-beta)) "
            "before the first spike"
        )
        notes.append(f"dt = 1e-4 s as snnTorch's importer assumes (the model's dt is {dt:g} s)")
    if lagged:
        notes.append(
            f"the lagged ordering of {_layers(lagged)} (P driven by the previous Q) becomes the "
            "current ordering: the one-step lag is dropped"
        )
    if dialect == "snntorch" and include_readouts:
        notes.append(
            "snnTorch's importer (nirtorch's nir_to_torch) never finishes on a graph with "
            "several Output nodes: export with include_readouts=False (--no-readouts) for it"
        )
    return nodes, edges, notes


def _layers(indices: list[int]) -> str:
    return ("layer " if len(indices) == 1 else "layers ") + ", ".join(map(str, indices))


# ======================================================================================
# import
# ======================================================================================


def _label(source: Any) -> str:
    return str(source) if isinstance(source, (str, Path)) else "NIR graph"


def _read(source: Any) -> tuple["nir.NIRGraph", str]:
    nir = _nir()
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


def _meta_value(meta: dict, key: str, default: Any = None) -> Any:
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
        if len(self.pred[key]) != 1:
            raise self.err(key, f"has {len(self.pred[key])} inputs where a DECOLLE layer has 1")


def from_nir(
    source: "str | Path | nir.NIRGraph", dt: float | None = None, surrogate: str | None = None
) -> DecolleNetwork:
    """A :class:`DecolleNetwork` for inference from a NIR file or graph made by :func:`export_nir`.

    Exact-mode graphs are read structurally (LI, [Delay], LI, Affine/Conv2d, [max pool],
    Threshold with the refractory loop LI -> Scale); portable graphs (CubaLIF) need the
    threefactor metadata that :func:`export_nir` writes, which restores the refractory term,
    max pooling and ordering. ``dt`` (seconds) is needed only when the graph metadata has
    none. The network's readouts hold the exported ``G``; a graph without readouts gives
    readouts with 0 outputs. Raises :class:`NIRError` (a ``ValueError``) for files that are
    not NIR and graphs with nodes a DECOLLE network cannot hold.
    """
    nir = _nir()
    graph, label = _read(source)
    meta = graph.metadata if isinstance(graph.metadata, dict) else {}
    fmt = _meta_value(meta, "format")
    if fmt is not None and fmt != FORMAT:
        raise NIRError(f"{label}: metadata format {fmt!r} is not {FORMAT!r}")
    if dt is None:
        dt = _meta_value(meta, "dt")
    if dt is None:
        raise NIRError(f"{label}: the graph metadata has no dt; pass dt (seconds per step) to from_nir")
    dt = float(dt)
    if surrogate is None:
        surrogate = _meta_value(meta, "surrogate", "boxcar")
    if surrogate not in SURROGATES:
        surrogate = "boxcar"
    g = _Graph(graph, label)

    inputs = [k for k, n in graph.nodes.items() if isinstance(n, nir.Input)]
    if len(inputs) != 1:
        raise NIRError(f"{label}: has {len(inputs)} Input nodes; a DECOLLE network has exactly 1")
    supported = (nir.Input, nir.Output, nir.Flatten, nir.LI, nir.Delay, nir.Affine, nir.Conv2d,
                 nir.SumPool2d, nir.AvgPool2d, nir.Threshold, nir.Scale, nir.CubaLIF)
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
    if isinstance(node, nir.Output):
        return True
    if isinstance(node, nir.LI):
        # refractory trace: LI -> Scale -> back into the spiking node
        return any(isinstance(g.node(s), nir.Scale) and spikes in g.succ[s] for s in g.succ[key])
    if isinstance(node, nir.Flatten):
        return len(g.succ[key]) == 1 and _is_readout_affine(g, nir, g.succ[key][0])
    return _is_readout_affine(g, nir, key)


def _is_readout_affine(g: _Graph, nir, key: str) -> bool:
    return isinstance(g.node(key), nir.Affine) and len(g.succ[key]) > 0 and all(
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
    n_in = math.prod(out_shape)
    if weight.ndim != 2 or weight.shape[1] != n_in:
        raise g.err(found[0], f"has weight shape {weight.shape}, not (classes, {n_in})")
    if np.any(np.asarray(node.bias) != 0):
        raise g.err(found[0], "has a non-zero bias; a DECOLLE readout Y = G S has none")
    readout = LocalReadout(n_in, weight.shape[0])
    with torch.no_grad():
        readout.g.copy_(torch.from_numpy(weight))
        readout.h.copy_(readout.g)
    return readout


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
    if isinstance(node, (nir.Affine, nir.Conv2d)):
        return _read_portable_layer(g, nir, key, in_shape, dt, meta, surrogate)
    raise g.err(key, "cannot start a DECOLLE layer (expected LI, Affine or Conv2d)")


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
        if _meta_value(g.node(key).metadata, POOL_KEY) != "max":
            raise g.err(key, f"is {type(g.node(key)).__name__} pooling; a DECOLLE layer pools "
                             f"only by max (metadata {POOL_KEY} = 'max')")
        pool = _pool_kernel(g, nir, key, g.node(key))
        key = _step(g, key)
    spike_key = key
    thr = g.node(spike_key)
    if not isinstance(thr, nir.Threshold):
        raise g.err(spike_key, "stands where the layer's Threshold belongs")
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
    params = DecolleParams(alpha=alpha, beta=beta, gamma=gamma, rho=rho, ordering=ordering)
    layer = DecolleLayer(synapse, params, pool, surrogate)
    out_shape = tuple(layer.output_shape(tuple(in_shape)))
    threshold = np.asarray(thr.threshold, dtype=np.float64)
    if threshold.shape != out_shape:
        raise g.err(spike_key, f"has shape {threshold.shape}, but the layer's output is {out_shape}")
    _fold_threshold(g, spike_key, layer, threshold)
    return layer, spike_key, out_shape


def _fold_threshold(g: _Graph, key: str, layer: DecolleLayer, threshold: np.ndarray) -> None:
    """U >= t is U - t >= 0: fold a threshold that is constant per output unit/channel into the bias."""
    if not np.any(threshold != 0.0):
        return
    per = threshold.reshape(threshold.shape[0], -1)
    if layer.pool is not None or np.any(per != per[:, :1]):
        raise g.err(key, "has a threshold that varies within a channel, which the bias cannot hold")
    with torch.no_grad():
        layer.synapse.bias.sub_(torch.from_numpy(per[:, 0]).to(layer.synapse.bias.dtype))


def _read_portable_layer(g: _Graph, nir, key: str, in_shape, dt: float, meta: dict, surrogate: str):
    syn_key = key
    syn_node = g.node(key)
    synapse = _torch_synapse(g, nir, key, syn_node, in_shape)
    key = _step(g, key)
    g.only_pred(key)
    pool = 1
    if isinstance(g.node(key), (nir.SumPool2d, nir.AvgPool2d)):
        pool = _pool_kernel(g, nir, key, g.node(key))
        if _meta_value(g.node(key).metadata, POOL_KEY) != "max":
            raise g.err(key, "is not marked as a max pool; a DECOLLE layer pools only by max")
        key = _step(g, key)
        g.only_pred(key)
    neuron = g.node(key)
    if not isinstance(neuron, nir.CubaLIF):
        raise g.err(key, "stands where the layer's CubaLIF belongs")
    nm = neuron.metadata or {}
    missing = [k for k in ("alpha", "beta", "gamma", "rho", "ordering", "bias_in") if k not in nm]
    if missing:
        raise g.err(key, "lacks the threefactor metadata (alpha, beta, gamma, rho, ordering) "
                         "needed to restore a DECOLLE neuron from a CubaLIF")
    ordering = _meta_value(nm, "ordering")
    if ordering not in ORDERINGS:
        raise g.err(key, f"has ordering {ordering!r} in its metadata; valid: {', '.join(ORDERINGS)}")
    params = DecolleParams(
        alpha=float(_meta_value(nm, "alpha")), beta=float(_meta_value(nm, "beta")),
        gamma=float(_meta_value(nm, "gamma")), rho=float(_meta_value(nm, "rho")), ordering=ordering,
    )
    # the taus must agree with the metadata decays (a graph edited after export would not)
    for what, tau, decay in (("tau_mem", neuron.tau_mem, params.alpha), ("tau_syn", neuron.tau_syn, params.beta)):
        got = 1.0 - dt / _uniform(tau, what, f"{g.label}: node {key!r}")
        if abs(got - decay) > 1e-6:
            raise g.err(key, f"has {what} for decay {got:.6g}, but its metadata says {decay:.6g}")
    layer = DecolleLayer(synapse, params, pool, surrogate)
    out_shape = tuple(layer.output_shape(tuple(in_shape)))
    if _meta_value(nm, "bias_in") == "v_threshold":
        v_th = np.asarray(neuron.v_threshold, dtype=np.float64)
        if v_th.shape != out_shape:
            raise g.err(key, f"has shape {v_th.shape}, but the layer's output is {out_shape}")
        if np.any(np.asarray(syn_node.bias) != 0):
            raise g.err(syn_key, "has a bias although the CubaLIF metadata puts it in v_threshold")
        per = v_th.reshape(v_th.shape[0], -1)
        if np.any(per != per[:, :1]):
            raise g.err(key, "has a v_threshold that varies within a channel")
        with torch.no_grad():
            layer.synapse.bias.copy_(torch.from_numpy(-per[:, 0]).to(torch.float32))
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
                        help="exact: reproduces the DECOLLE neuron (read back with from_nir); "
                             "portable: CubaLIF nodes for other simulators, approximated "
                             "(default: exact)")
    parser.add_argument("--dialect", choices=DIALECTS, default=None,
                        help="portable mode: whose CubaLIF convention to follow (default: norse)")
    parser.add_argument("--readouts", action=argparse.BooleanOptionalAction, default=True,
                        help="export each layer's fixed readout G as an extra output (default: yes)")
    parser.add_argument("--dt", type=float, default=DEFAULT_DT,
                        help=f"seconds per time step (default: {DEFAULT_DT:g})")
    return parser


def export_cli(args: argparse.Namespace) -> int:
    """Run ``threefactor export``; approximations are printed as one warning line."""
    import sys

    if args.mode == "exact" and args.dialect is not None:
        raise NIRError("--dialect applies to --mode portable only")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NIRApproximationWarning)
        graph = export_nir(args.source, args.out, mode=args.mode, dialect=args.dialect,
                           include_readouts=args.readouts, dt=args.dt)
    for w in caught:
        print(f"threefactor: warning: {w.message}", file=sys.stderr)
    print(f"wrote {args.out}: {args.mode} mode, {len(graph.nodes)} nodes, "
          f"{int(graph.metadata['n_layers'])} layers, dt {graph.metadata['dt']:g} s")
    return 0
