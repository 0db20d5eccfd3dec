"""Export of trained networks to other formats: NIR (see docs/nir.md)."""

from .check import check_nir, format_report, nirtorch_node_map
from .export import (
    DIALECTS,
    MODES,
    NIRApproximationWarning,
    NIRDtWarning,
    NIRError,
    add_export_arguments,
    export_cli,
    export_nir,
    from_nir,
    importer_problems,
)

__all__ = [
    "DIALECTS", "MODES", "NIRApproximationWarning", "NIRDtWarning", "NIRError",
    "add_export_arguments", "check_nir", "export_cli", "export_nir", "format_report", "from_nir",
    "importer_problems", "nirtorch_node_map",
]
