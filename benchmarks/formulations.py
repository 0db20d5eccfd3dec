"""Accuracy of each DECOLLE formulation: the same data, network and training, seeds apart.

    python -m benchmarks.formulations [--configs default nmnist-small] [--seeds 0 1 2]
        [--formulations after_pool authors current_before_pool] [--jobs 2] [--threads 1]
        [--set key=value ...] [--out DIR] [--reuse]

A formulation is a set of ``network.*`` overrides (FORMULATIONS below); ``authors`` is the
authors' code's (tests/test_decolle_public.py shows that it computes what theirs does). Every
(config, formulation, seed) is one ``threefactor train`` in its own process, ``--jobs`` at a
time with ``--threads`` threads each. Writes DIR/formulations.json, DIR/formulations.md and
DIR/formulations.png (last-layer test accuracy per run) and prints the table; ``--reuse``
reads the runs already finished in DIR/runs (e.g. to add a formulation or a seed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

FORMULATIONS: dict[str, list[str]] = {
    # R after the pool, one per pooled unit; U = 0 spikes; input reaches U in the same step
    "after_pool": ["network.neuron.ordering=current", "network.neuron.refractory=after_pool",
                   "network.neuron.spike_at_zero=true", "network.readout_bias=false"],
    # the authors' code: P lags Q by a step, R before the pool, spike on U > 0, readout bias
    "authors": ["network.neuron.ordering=lagged", "network.neuron.refractory=before_pool",
                "network.neuron.spike_at_zero=false", "network.readout_bias=true"],
    # the authors' neuron with the current-Q ordering (exact as NIR CubaLIF + OR pooling)
    "current_before_pool": ["network.neuron.ordering=current", "network.neuron.refractory=before_pool",
                            "network.neuron.spike_at_zero=false", "network.readout_bias=false"],
}


def run_one(config: str, formulation: str, seed: int, args) -> dict:
    out = Path(args.out) / "runs" / f"{config}-{formulation}-seed{seed}"
    summary = out / "summary.json"
    if args.reuse and summary.exists():  # a finished run of an earlier invocation
        data = json.loads(summary.read_text())
        print(f"{config:>14} {formulation:>20} seed {seed}: reused {out}", flush=True)
        return {"config": config, "formulation": formulation, "seed": seed, "returncode": 0,
                "seconds": round(data.get("wall_time_s", 0.0), 1),
                "test_accuracy": list(data["test_accuracy"].values()), "reused": True}
    cmd = [sys.executable, "-m", "threefactor", "train", "--out", str(out), "--seed", str(seed),
           "--set", "train.progress=false", "--set", "train.plots=false", "--set", "train.tensorboard=false"]
    if config != "default":
        cmd += ["--config", config]
    for override in FORMULATIONS[formulation] + list(args.set):
        cmd += ["--set", override]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    row = {"config": config, "formulation": formulation, "seed": seed, "seconds": round(seconds, 1),
           "returncode": proc.returncode}
    if proc.returncode == 0 and summary.exists():
        row["test_accuracy"] = list(json.loads(summary.read_text())["test_accuracy"].values())
    else:
        row["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    print(f"{config:>14} {formulation:>20} seed {seed}: "
          f"{row.get('test_accuracy', row.get('error'))} ({seconds:.0f} s)", flush=True)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| config | formulation | last-layer test accuracy per seed | mean | every layer (mean) |",
             "|---|---|---|---|---|"]
    keys = sorted({(r["config"], r["formulation"]) for r in rows})
    for config, form in keys:
        done = [r for r in rows if (r["config"], r["formulation"]) == (config, form) and "test_accuracy" in r]
        if not done:
            continue
        last = [r["test_accuracy"][-1] for r in done]
        layers = [statistics.mean(r["test_accuracy"][i] for r in done) for i in range(len(done[0]["test_accuracy"]))]
        lines.append(f"| {config} | {form} | {', '.join(f'{100 * a:.1f}' for a in last)} | "
                     f"{100 * statistics.mean(last):.1f} | {' / '.join(f'{100 * a:.1f}' for a in layers)} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = sorted({r["config"] for r in rows})
    forms = [f for f in FORMULATIONS if any(r["formulation"] == f for r in rows)]
    fig, axes = plt.subplots(1, len(configs), figsize=(4.5 * len(configs), 3.5), squeeze=False)
    for ax, config in zip(axes[0], configs):
        for j, form in enumerate(forms):
            accs = [100 * r["test_accuracy"][-1] for r in rows
                    if r["config"] == config and r["formulation"] == form and "test_accuracy" in r]
            ax.scatter([j] * len(accs), accs, color=f"C{j}")
            if accs:
                ax.hlines(statistics.mean(accs), j - 0.3, j + 0.3, color=f"C{j}")
        ax.set_xticks(range(len(forms)), forms, rotation=15)
        ax.set_title("embedded (default config)" if config == "default" else config)
        ax.set_ylabel("last-layer test accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["default", "nmnist-small"])
    ap.add_argument("--formulations", nargs="+", default=list(FORMULATIONS), choices=list(FORMULATIONS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], help="extra override for every run")
    ap.add_argument("--out", default="benchmarks/results/formulations")
    ap.add_argument("--reuse", action="store_true",
                    help="read the runs already finished in OUT/runs instead of training them again")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(c, f, s) for c in args.configs for s in args.seeds for f in args.formulations]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda job: run_one(*job, args), jobs))
    (out / "formulations.json").write_text(json.dumps({"args": vars(args), "runs": rows}, indent=1))
    md = table(rows)
    (out / "formulations.md").write_text(md + "\n")
    plot(rows, out / "formulations.png")
    print(md)
    return 0 if all(r["returncode"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
