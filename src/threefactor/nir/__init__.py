"""NIR, the Neuromorphic Intermediate Representation (docs/nir.md): a network written to a NIR
graph (:mod:`.export`, with :mod:`.exact` and :mod:`.portable` for the two modes), a graph read
back into a network (:mod:`.load`), a written graph run by other simulators next to the run
(:mod:`.check`), the command ``threefactor export`` (:mod:`.command`), and the vocabulary they
share (:mod:`.graph`)."""

from ..errors import NIRError
from .check import check_nir, format_report, nirtorch_node_map
from .command import add_export_arguments, export_cli
from .export import export_nir
from .graph import DIALECTS, MODES, NIRApproximationWarning, NIRDtWarning
from .load import from_nir
from .portable import importer_problems

__all__ = [
    "DIALECTS", "MODES", "NIRApproximationWarning", "NIRDtWarning", "NIRError",
    "add_export_arguments", "check_nir", "export_cli", "export_nir", "format_report", "from_nir",
    "importer_problems", "nirtorch_node_map",
]
