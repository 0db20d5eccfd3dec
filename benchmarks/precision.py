"""Accuracy in bf16 against fp32: the same training command, seed for seed, in both precisions.

    OMP_NUM_THREADS=1 ./dev run python -m benchmarks.precision [--configs default nmnist-small]
        [--seeds 0 1 2] [--precisions fp32 bf16] [--set KEY=VALUE ...] [--threads 1]
        [--out benchmarks/results/precision] [--name precision]

Every run is ``threefactor train --config C --seed S --precision P`` (``default``: no
``--config``, i.e. ``./dev train``'s embedded dataset) in its own subprocess, written to
``OUT/runs/<config>_seed<S>_<P>``. Its final per-layer test accuracy (evaluated in the run's own
precision) and wall time come from the run's ``summary.json``, its peak resident memory from the
operating system (``wait4``'s ``ru_maxrss``). A run already finished under ``OUT/runs`` is read,
not repeated, so an interrupted sweep resumes where it stopped.

The table answers the question of issue #19: is the bf16 - fp32 difference of the mean
accuracy within the seed-to-seed spread? For each config it gives, per precision, the mean and
the sample standard deviation over seeds of the last layer's accuracy, and the paired
differences (bf16 - fp32 of the same seed). Writes ``OUT/NAME.json`` and ``OUT/NAME.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _harness as H  # noqa: E402


def run_one(config: str, seed: int, precision: str, overrides: list[str], out: Path, threads: int) -> dict:
    """Train one run in a subprocess (or read it where it already finished); its row."""
    run_dir = out / "runs" / f"{config}_seed{seed}_{precision}"
    summary_path = run_dir / "summary.json"
    row = {"config": config, "seed": seed, "precision": precision, "run": str(run_dir)}
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        row.update(reused=True, maxrss_mb=None)
    else:
        if run_dir.exists():  # an interrupted run: start it again from scratch
            shutil.rmtree(run_dir)
        cmd = [sys.executable, "-m", "threefactor", "train", "--seed", str(seed), "--precision", precision,
               "--out", str(run_dir), "--set", "train.progress=false"]
        if config != "default":
            cmd += ["--config", config]
        for o in overrides:
            cmd += ["--set", o]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        print(f"[{config} seed {seed} {precision}] {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise SystemExit(f"{config} seed {seed} {precision}: threefactor train exited with {proc.returncode}")
        summary = json.loads(summary_path.read_text())
        row.update(reused=False, maxrss_mb=usage.ru_maxrss / 1024.0, elapsed_s=time.perf_counter() - t0)
    acc = summary["test_accuracy"]
    row.update(test_accuracy=[acc[k] for k in sorted(acc, key=lambda k: int(k.removeprefix("layer")))],
               wall_time_s=summary["wall_time_s"], threads=summary.get("threads"),
               summary_precision=summary.get("precision"))
    last = row["test_accuracy"][-1]
    print(f"[{config} seed {seed} {precision}] last-layer test accuracy {last:.4f} "
          f"({row['wall_time_s']:.0f} s)", file=sys.stderr, flush=True)
    return row


def summarise(rows: list[dict], precisions: list[str]) -> list[dict]:
    """Per config: mean and std over seeds of the last layer's accuracy per precision, and the
    paired bf16 - fp32 differences."""
    out = []
    for config in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == config]
        entry = {"config": config, "per_precision": {}}
        for p in precisions:
            last = [r["test_accuracy"][-1] for r in mine if r["precision"] == p]
            entry["per_precision"][p] = {
                "last_layer": last, "mean": statistics.fmean(last),
                "std": statistics.stdev(last) if len(last) > 1 else None,
                "mean_wall_s": statistics.fmean(r["wall_time_s"] for r in mine if r["precision"] == p)}
        if len(precisions) == 2:
            a, b = precisions
            by_seed = {(r["seed"], r["precision"]): r["test_accuracy"][-1] for r in mine}
            seeds = sorted({r["seed"] for r in mine})
            diffs = [by_seed[(s, b)] - by_seed[(s, a)] for s in seeds]
            spread = [entry["per_precision"][p]["std"] for p in precisions]
            entry["paired_difference"] = {"pairs": diffs, "mean": statistics.fmean(diffs)}
            entry["seed_spread_std"] = max((s for s in spread if s is not None), default=None)
        out.append(entry)
    return out


def table(rows: list[dict], summary: list[dict], precisions: list[str]) -> str:
    lines = ["| config | seed | precision | test accuracy, layer 1 / 2 / ... | wall time (s) | peak RSS (MB) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        accs = " / ".join(f"{100 * a:.1f}" for a in r["test_accuracy"])
        rss = "n/a" if r.get("maxrss_mb") is None else f"{r['maxrss_mb']:.0f}"
        lines.append(f"| {r['config']} | {r['seed']} | {r['precision']} | {accs} | {r['wall_time_s']:.0f} | {rss} |")
    lines += ["", "| config | " + " | ".join(f"{p}: last layer, mean (std over seeds)" for p in precisions)
              + " | paired difference " + (f"{precisions[1]} - {precisions[0]}" if len(precisions) == 2 else "")
              + " (mean; per seed) |", "|---|" + "---|" * (len(precisions) + 1)]
    for e in summary:
        cells = []
        for p in precisions:
            s = e["per_precision"][p]
            cells.append(f"{100 * s['mean']:.2f} %" + (f" ({100 * s['std']:.2f})" if s["std"] is not None else ""))
        d = e.get("paired_difference")
        diff = (f"{100 * d['mean']:+.2f} points; " + ", ".join(f"{100 * x:+.2f}" for x in d["pairs"])) if d else ""
        lines.append(f"| {e['config']} | " + " | ".join(cells) + f" | {diff} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.precision", description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["default", "nmnist-small"],
                   help="presets or files; 'default' is ./dev train's embedded dataset")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--seeds-for", nargs="*", default=["nmnist-small=0"], metavar="CONFIG=S[,S...]",
                   help="seeds of one config instead of --seeds (default: nmnist-small=0, an 8-epoch run "
                        "of 1,000 recordings)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "auto"])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="overrides for every run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=H.ROOT / "benchmarks" / "results" / "precision")
    p.add_argument("--name", default="precision")
    args = p.parse_args(argv)
    seeds_for = {}
    for item in args.seeds_for:
        key, sep, val = item.partition("=")
        if not sep:
            p.error(f"--seeds-for {item!r}: expected CONFIG=S[,S...]")
        seeds_for[key] = [int(v) for v in val.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for config in args.configs:
        for seed in seeds_for.get(config, args.seeds):
            for precision in args.precisions:
                rows.append(run_one(config, seed, precision, args.set, args.out, args.threads))
    summary = summarise(rows, args.precisions)
    data = {"machine": H.machine_info(args.threads),
            "command": " ".join(["python -m benchmarks.precision", *sys.argv[1:]]), "overrides": args.set,
            "rows": rows, "summary": summary}
    H.write_json(args.out / f"{args.name}.json", data)
    text = table(rows, summary, args.precisions)
    (args.out / f"{args.name}.md").write_text(text)
    print(text)
    return data


if __name__ == "__main__":
    main()
