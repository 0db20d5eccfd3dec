"""The vocabulary that writing, reading and checking a NIR graph share: the format's name and
version, the modes and dialects, the metadata keys threefactor adds to nodes, how nodes are
named, the warnings, and reading a graph from a file (docs/nir.md).

Node names number layers from 1, as metrics.jsonl, TensorBoard, the plots and every message
do: the first layer's nodes are ``layer1_...`` and its readout's output is ``readout1``.
Graphs of format version 1 numbered them from 0 (``layer0_...``, ``readout0``); reading a graph
does not depend on its names (:mod:`threefactor.nir.load` follows its edges), and
:func:`first_layer_number` tells which numbering a graph's names use.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import NIRError

if TYPE_CHECKING:  # pragma: no cover
    import nir

__all__ = [
    "FORMAT", "FORMAT_VERSION", "MODES", "DIALECTS", "POOL_KEY", "ROLE_KEY", "FIRST_LAYER",
    "NIRApproximationWarning", "NIRDtWarning", "import_nir", "read_graph", "meta_value",
    "layer_name", "readout_name", "first_layer_number", "layer_list",
]

FORMAT = "threefactor-decolle"
# 2: layers numbered from 1 in node names (version 1 numbered them from 0)
FORMAT_VERSION = 2
MODES: tuple[str, ...] = ("exact", "portable")
DIALECTS: tuple[str, ...] = ("norse", "snntorch")
POOL_KEY = "threefactor_pool"  # node metadata marking a pool node as max pooling
ROLE_KEY = "threefactor_role"  # node metadata naming the node's part of a DECOLLE layer
FIRST_LAYER = 1  # the number of the first layer in node names and messages


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


def layer_name(index: int, first: int = FIRST_LAYER) -> str:
    """The prefix of the node names of the layer at 0-based position ``index``: ``layer1``
    for the first (``first=0``: the names of format version 1)."""
    return f"layer{index + first}"


def readout_name(index: int, first: int = FIRST_LAYER) -> str:
    """The name of the Output node of the readout of the layer at 0-based position ``index``."""
    return f"readout{index + first}"


def first_layer_number(graph: "nir.NIRGraph") -> int:
    """The number of the first layer in ``graph``'s node names: 0 in graphs of format
    version 1 (whose first layer's nodes are ``layer0_...``), otherwise :data:`FIRST_LAYER`."""
    legacy = any(key.startswith(f"{layer_name(0, 0)}_") for key in graph.nodes)
    return 0 if legacy else FIRST_LAYER


def layer_list(indices: list[int]) -> str:
    """"layer 2" or "layers 1, 2" for 0-based layer positions, numbered as in messages."""
    numbers = ", ".join(str(i + FIRST_LAYER) for i in indices)
    return ("layer " if len(indices) == 1 else "layers ") + numbers


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
