"""Export of trained networks to other formats: NIR (see docs/nir.md)."""

from .nir_export import (
    DIALECTS,
    MODES,
    NIRApproximationWarning,
    NIRError,
    add_export_arguments,
    export_cli,
    export_nir,
    from_nir,
)

__all__ = [
    "DIALECTS", "MODES", "NIRApproximationWarning", "NIRError", "add_export_arguments",
    "export_cli", "export_nir", "from_nir",
]
