"""`threefactor` command line: errors from bad input are one sentence, never a traceback."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .config import ConfigError, load_config, presets


def _train(args: argparse.Namespace) -> int:
    from .config import dump_config
    from .train import RunError, train

    overrides = list(args.set or [])
    if args.device is not None:
        overrides.append(f"device={args.device}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    cfg = load_config(args.config, overrides)
    out = Path(args.out) if args.out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    print(f"run directory: {out}")
    summary = train(cfg, out)
    accs = " ".join(f"{k} {v:.3f}" for k, v in summary["test_accuracy"].items())
    print(f"done in {summary['wall_time_s']:.0f} s; test accuracy {accs}; results in {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="threefactor", description="Online, local learning in spiking neural networks."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a network (DECOLLE on the embedded dataset by default)")
    p.add_argument("--config", help=f"a YAML file or a preset ({', '.join(presets()) or 'none yet'})")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override one setting, e.g. --set optim.lr=0.002 (repeatable)")
    p.add_argument("--out", help="run directory (default: runs/<date-time>)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--seed", type=int, help="random seed of the run (network init, data order)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .train import RunError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, RunError) as err:
        print(f"threefactor: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("threefactor: interrupted; the run directory keeps the last completed epoch",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
