"""The command ``threefactor export RUN OUT.nir [--mode ...] [--check]``: its arguments
(:func:`add_export_arguments`) and what it does (:func:`export_cli`)."""

from __future__ import annotations

import argparse
import sys
import warnings

from ..errors import NIRError
from .check import check_nir, format_report
from .export import export_nir
from .graph import DIALECTS, MODES, NIRApproximationWarning, NIRDtWarning

__all__ = ["add_export_arguments", "export_cli"]


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
        print(format_report(check_nir(args.out, args.source)))
    return 0
