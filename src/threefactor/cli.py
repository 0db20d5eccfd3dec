"""`threefactor` command line: errors from bad input are one sentence, never a traceback."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .config import ConfigError, load_config, presets
from .errors import NIRError
from .nir.command import add_export_arguments, export_cli


def _is_main_process() -> bool:
    """False in every process but the first of a torchrun launch (they print nothing)."""
    from .errors import DistributedError
    from .run.collective import env_info

    try:
        return env_info().is_main
    except DistributedError:
        return True


def _train(args: argparse.Namespace) -> int:
    if args.resume is not None:
        return _resume(args)
    overrides = list(args.set or [])
    if args.device is not None:
        overrides.append(f"device={args.device}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.precision is not None:
        overrides.append(f"train.precision={args.precision}")
    cfg = load_config(args.config, overrides)
    out = Path(args.out) if args.out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    return _run_training(args, cfg, out, resume=False)


def _resume(args: argparse.Namespace) -> int:
    """`train --resume RUN_DIR [--set KEY=VALUE ...]`: continue a run with its own config.yaml;
    ``--set`` may change what does not change what the run computes (``RESUMABLE_CHANGES``:
    e.g. ``train.epochs``, which extends a finished run)."""
    from .errors import RunError
    from .run.from_config import RESUMABLE_CHANGES

    run = Path(args.resume)
    given = [flag for flag, value in (("--config", args.config), ("--seed", args.seed),
                                      ("--precision", args.precision)) if value]
    if args.out is not None and Path(args.out).resolve() != run.resolve():
        given.append("--out")
    if given:
        raise RunError(
            f"--resume continues {run} with the settings in its config.yaml, so it cannot be "
            f"combined with {' or '.join(given)} (only --device and --set of "
            f"{', '.join(RESUMABLE_CHANGES[1:])} may be given)"
        )
    fixed = [a.partition("=")[0] for a in args.set or [] if a.partition("=")[0] not in RESUMABLE_CHANGES]
    if fixed:
        raise RunError(
            f"--resume continues {run} with the settings in its config.yaml, and --set cannot change "
            f"{fixed[0]!r} there (it changes what the run computes); --set may change only "
            f"{', '.join(RESUMABLE_CHANGES[1:])}, e.g. --set train.epochs=N to extend the run"
        )
    if not (run / "config.yaml").is_file():
        raise RunError(f"{run}: not a run directory (no config.yaml there) to resume")
    cfg = load_config(run / "config.yaml", [*(args.set or []), *([f"device={args.device}"] if args.device else [])])
    return _run_training(args, cfg, run, resume=True)


def _run_training(args: argparse.Namespace, cfg, out: Path, resume: bool) -> int:
    """Train (or resume) ``cfg`` into ``out``, or only print the config (--print-config)."""
    from .config import dump_config
    from .run.from_config import train

    main_process = _is_main_process()
    if args.print_config:
        if main_process:
            print(dump_config(cfg), end="")
        return 0
    if main_process:
        print(f"{'resuming run directory' if resume else 'run directory'}: {out}")
    args.run_dir = out
    summary = train(cfg, out, resume=resume)
    accs = " ".join(f"{k} {v:.3f}" for k, v in summary["test_accuracy"].items())
    if main_process:
        print(f"done in {summary['wall_time_s']:.0f} s; test accuracy {accs}; results in {out}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from .run.reopen import plot_run

    paths = plot_run(args.run_dir)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .errors import RunError
    from .report.plots import plot_confusion
    from .run.reopen import evaluate_run

    result = evaluate_run(args.run_dir, args.set or [], args.device)
    print(f"{result.samples} test samples, {len(result.classes)} classes")
    for i, (acc, loss) in enumerate(zip(result.accuracy, result.loss)):
        print(f"layer {i + 1}: accuracy {acc:.4f}, loss {loss:.4f}")
    run = Path(args.run_dir)
    out = Path(args.out) if args.out else (run if run.is_dir() else run.parent) / "plots" / "confusion.png"
    try:
        path = plot_confusion(result.confusion, result.accuracy, result.classes, out)
    except OSError as err:
        raise RunError(f"cannot write {out}: {err.strerror or err}") from None
    print(f"wrote {path}")
    return 0


def _stream(args: argparse.Namespace) -> int:
    """`stream [--config] [--set ...] [--out] [--steps N] [--no-learn] | --resume RUN [--steps N]`."""
    from .errors import RunError
    from .stream.from_config import RESUMABLE_STREAM_CHANGES, stream

    overrides = list(args.set or [])
    if args.steps is not None:
        overrides.append(f"stream.steps={args.steps}")
    if args.no_learn:
        overrides.append("stream.learn=false")
    if args.device is not None:
        overrides.append(f"device={args.device}")
    if args.resume is not None:
        run = Path(args.resume)
        fixed = [a.partition("=")[0] for a in overrides if a.partition("=")[0] not in RESUMABLE_STREAM_CHANGES]
        if args.config or fixed:
            raise RunError(f"--resume continues the stream in {run} with its own config.yaml; only "
                           f"{', '.join(RESUMABLE_STREAM_CHANGES)} may be changed (e.g. --steps to go on longer)")
        if not (run / "config.yaml").is_file():
            raise RunError(f"{run}: not a stream's run directory (no config.yaml there) to resume")
        cfg, out = load_config(run / "config.yaml", overrides), run
    else:
        cfg = load_config(args.config or "stream", overrides)
        out = Path(args.out) if args.out else Path("runs") / time.strftime("stream-%Y%m%d-%H%M%S")
    print(f"{'resuming stream' if args.resume else 'stream'} run directory: {out}")
    args.run_dir = out
    summary = stream(cfg, out, resume=args.resume is not None)
    print(f"done: {summary['steps']} steps ({summary['stream_time_s']:.1f} s of stream time) in "
          f"{summary['wall_time_s']:.0f} s, {summary['steps_per_s']:.0f} steps/s, "
          f"{summary['realtime_factor']:.2f}x real time; results in {out}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    import json

    from .run.reopen import predict_files

    predictions = predict_files(args.run_dir, args.files, args.device)
    if args.json:
        print(json.dumps([vars(p) for p in predictions], indent=2))
        return 0
    for p in predictions:
        layers = range(len(p.classes)) if args.all_layers else [len(p.classes) - 1]
        voted = "  ".join(f"layer {i + 1}: {p.classes[i]} ({100 * p.vote_share[i]:.0f} % of steps)" for i in layers)
        print(f"{p.path}\t{voted}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demos import run_regression
    from .errors import RunError

    out = Path(args.out) if args.out else Path("runs") / time.strftime("regression-%Y%m%d-%H%M%S")
    kwargs = {k: v for k, v in (("epochs", args.epochs), ("hidden", args.hidden),
                                ("duration_ms", args.duration_ms)) if v is not None}
    try:
        result = run_regression(out, seed=args.seed, **kwargs)
    except ValueError as err:
        raise RunError(str(err)) from None
    except OSError as err:
        raise RunError(f"cannot write the output directory {out}: {err.strerror}") from None
    print(f"done in {result.seconds:.0f} s; final MSE per layer "
          + " ".join(f"L{i + 1} {e:.4f}" for i, e in enumerate(result.mse)) + f"; results in {out}")
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("threefactor")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def _torch_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return "not installed"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="threefactor", description="Online, local learning in spiking neural networks."
    )
    parser.add_argument("--version", action="version",
                        version=f"threefactor {_version()} (torch {_torch_version()})")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a network (DECOLLE on the embedded dataset by default)")
    p.add_argument("--config", help=f"a YAML file or a preset ({', '.join(presets()) or 'none yet'})")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override one setting, e.g. --set optim.lr=0.002 (repeatable)")
    p.add_argument("--out", help="run directory (default: runs/<date-time>)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--seed", type=int, help="random seed of the run (network init, data order)")
    p.add_argument("--precision", choices=["fp32", "bf16", "auto"],
                   help="train.precision: fp32, bf16 (fp32 master weights) or auto (bf16 where native)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last checkpoint, with its own config.yaml")
    p.set_defaults(func=_train)
    p = sub.add_parser("export", help="write a trained network to NIR (exact or portable)")
    add_export_arguments(p)
    p.set_defaults(func=export_cli)
    p = sub.add_parser("plot", help="(re)draw the plots of a finished or running run into RUN_DIR/plots")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (config.yaml, checkpoint.pt, metrics.jsonl)")
    p.set_defaults(func=_plot)
    p = sub.add_parser("eval", help="a run's accuracy per layer and confusion matrices, on its test split or other data")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (or its checkpoint.pt)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="other data of the same classes, e.g. --set data.root=... --set data.n_test=500")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", help="the confusion-matrix PNG (default: RUN_DIR/plots/confusion.png)")
    p.set_defaults(func=_eval)
    p = sub.add_parser("stream", help="learn online from an endless event stream, evaluated prequentially")
    p.add_argument("--config", help="a YAML file or a preset (default: stream)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override one setting, e.g. --set stream.scenario=domain_shift (repeatable)")
    p.add_argument("--out", help="run directory (default: runs/stream-<date-time>)")
    p.add_argument("--steps", type=int, help="1 ms steps in all (stream.steps)")
    p.add_argument("--no-learn", action="store_true", help="inference only (stream.learn=false)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the stream in RUN_DIR from its last checkpoint")
    p.set_defaults(func=_stream)
    p = sub.add_parser("predict", help="the class a run's network gives each of some recordings (no labels needed)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (or its checkpoint.pt)")
    p.add_argument("files", metavar="FILE", nargs="+", help="event files (.aedat, .npy, .bin)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--all-layers", action="store_true", help="every layer's class, not only the last layer's")
    p.add_argument("--json", action="store_true", help="print the predictions as JSON")
    p.set_defaults(func=_predict)
    p = sub.add_parser("demo", help="small demonstrations of the paper (regression: Sec. 3.1, Fig. 1)")
    p.add_argument("name", choices=["regression"], help="which demo")
    p.add_argument("--out", help="output directory (default: runs/regression-<date-time>)")
    p.add_argument("--epochs", type=int, default=None, help="presentations of the input (default: 20)")
    p.add_argument("--hidden", type=int, default=None, help="neurons per layer (default: 512)")
    p.add_argument("--duration-ms", type=int, default=None, help="length of the input spike train (default: 500)")
    p.add_argument("--seed", type=int, default=0, help="random seed (input spike train, weights)")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import RunError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, RunError, NIRError) as err:
        # Under torchrun a problem one process met is raised on all; only the process that met
        # it, or process 0, says it.
        if not getattr(err, "relayed", False) or _is_main_process():
            print(f"threefactor: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if _is_main_process():
            run = getattr(args, "run_dir", None)
            if run is not None and not (Path(run) / "checkpoint.pt").exists():
                print("threefactor: interrupted before the run's first checkpoint; it left nothing "
                      "to resume", file=sys.stderr)
            else:
                print(f"threefactor: interrupted; the run directory keeps its last checkpoint "
                      f"(continue with threefactor train --resume {run or 'RUN_DIR'})", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
