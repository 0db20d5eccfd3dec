"""Export a DECOLLE network to NIR, the Neuromorphic Intermediate Representation
(:func:`export_nir`; docs/nir.md has the mapping tables and the measurements).

Two modes: ``exact`` (:mod:`threefactor.nir.exact`) writes every term of our neuron as plain
NIR nodes, so that :func:`threefactor.nir.from_nir` gives back a network with identical
spikes; ``portable`` (:mod:`threefactor.nir.portable`) writes only nodes that Norse and
snnTorch import, in the convention of a dialect (``norse`` or ``snntorch``), and warns with
:class:`NIRApproximationWarning` where it has to approximate.

Time: ``dt`` (seconds per step) is the run's own, ``data.dt_us``, in every time constant and
in the graph metadata; an explicit ``dt`` that differs is an override and warns
(:class:`NIRDtWarning`).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
from torch import nn

from ..errors import NIRError, RunError
from ..model.network import DecolleNetwork
from ..run.checkpoint import load_checkpoint
from .exact import DISCRETISATION, exact_nodes
from .graph import (
    DIALECTS, FORMAT, FORMAT_VERSION, MODES, NIRApproximationWarning, NIRDtWarning, import_nir,
)
from .nodes import layer_shapes, time_constant
from .portable import DIALECT_NOTES, IMPORTER_NAMES, IMPORTER_STEP, importer_problems, portable_nodes

if TYPE_CHECKING:  # pragma: no cover
    import nir

__all__ = ["DEFAULT_DT", "export_nir"]

# seconds per step of a network object, which carries no dt of its own (a run's is data.dt_us)
DEFAULT_DT = 1e-3


def _resolve_source(
    source: Any, input_shape: Iterable[int] | None
) -> tuple[DecolleNetwork, tuple[int, ...] | None, dict[str, Any], float | None]:
    """Network, per-sample input shape (or None), extra metadata and the run's dt in seconds
    (None for a network object) of ``source``."""
    if isinstance(source, DecolleNetwork):
        return source, None if input_shape is None else tuple(int(s) for s in input_shape), {}, None
    if isinstance(source, (str, Path)):
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
    :func:`threefactor.nir.from_nir`) or ``"portable"`` (for Norse and snnTorch, in the
    convention of ``dialect``: ``"norse"`` (default) or ``"snntorch"``; emits a
    :class:`NIRApproximationWarning` when it has to approximate). ``include_readouts`` adds the
    fixed readouts ``Y = G S`` (every layer's in exact mode, leading to outputs ``readout1``,
    ``readout2``, ...; the last layer's in portable mode, as the graph's one output).
    ``input_shape`` is one sample's input shape, needed for a network (not a checkpoint) whose
    first layer is convolutional. ``dt`` is seconds per time step: a run's own ``data.dt_us``
    by default (an explicit value that differs warns with :class:`NIRDtWarning`), 1e-3 for a
    network object. A portable graph that its dialect's importer could not run raises
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
        _ = layer_shapes(network, shape)
    except RuntimeError as err:
        raise NIRError(f"input shape {shape} does not fit the network's first layer ({err})") from None

    if mode == "exact":
        nodes, edges, notes = exact_nodes(nir, network, shape, dt, include_readouts)
    else:
        nodes, edges, notes = portable_nodes(nir, network, shape, dt, dialect, include_readouts)

    params = [layer.params for layer in network.layers]
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "mode": mode,
        "dialect": dialect or "threefactor",
        "dt": float(dt),
        "dt_source": dt_source,
        "time_unit": "s",
        "discretisation": DISCRETISATION if mode == "exact" else DIALECT_NOTES[dialect],
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
            meta[key] = time_constant(dt, meta[decay], decay)
    if notes:
        meta["approximations"] = "; ".join(notes)
    meta.update({k: v for k, v in extra.items() if k in ("source", "epoch")})

    graph = nir.NIRGraph(nodes=nodes, edges=edges, metadata=meta)
    if mode == "portable":
        problems = importer_problems(graph, dialect)
        if problems:
            raise NIRError(f"{IMPORTER_NAMES[dialect]} could not run this graph: " + "; ".join(problems))
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
