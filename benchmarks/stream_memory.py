"""Memory and speed of a stream that never ends: peak RSS after 10^4, 10^5, 10^6 steps.

    ./dev run python -m benchmarks.stream_memory [--steps 10000 100000 1000000] [--threads 2]
        [--set KEY=VALUE ...] [--name stream_memory]

Each length runs ``threefactor stream`` (the ``stream`` preset: the small network, batch 1, the
endless motion stream, learning at every step) in a fresh process and records its peak
resident memory (``ru_maxrss``) and that of the worker process that makes its segments
(``stream.prefetch``), steps per second and the real-time factor (stream time per wall second)
of the learner, and of the whole run. DECOLLE's memory does not depend on how
long the stream has run: the peaks should agree within a few percent. Writes
``benchmarks/results/stream/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "stream"


def worker(steps: int, overrides: list[str]) -> dict:
    from threefactor.config import load_config
    from threefactor.stream.from_config import stream
    from threefactor.stream.learner import read_rows

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("stream", [f"stream.steps={steps}", "train.progress=false", "train.plots=false",
                                     "device=cpu", "stream.checkpoint_every_steps=0", *overrides])
        t0 = time.perf_counter()
        summary = stream(cfg, Path(tmp) / "run", log=lambda m: None)
        wall = time.perf_counter() - t0
        rows = read_rows(Path(tmp) / "run")
    learner_s = sum(r["steps"] / r["steps_per_s"] for r in rows)
    # after the first window, which holds the start-up (compiling the step, first allocations)
    steady = statistics.median(r["steps_per_s"] for r in rows[1:]) if len(rows) > 1 else None
    # the segment worker has ended and been waited for: it is this process's only child
    worker_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"steps": summary["steps"], "wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "segment_worker_peak_rss_mb": worker_mb or None,
            "steps_per_s": summary["steps"] / wall, "learner_steps_per_s": summary["steps"] / learner_s,
            "steady_steps_per_s": steady,
            "realtime_factor": summary["stream_time_s"] / wall,
            "last_window_accuracy": rows[-1]["accuracy"][-1] if rows and rows[-1]["accuracy"] else None}


def _mb(value: float | None) -> str:
    return "-" if not value else f"{value:.1f}"


def _n(value: float | None) -> str:
    return "-" if not value else f"{value:.0f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", nargs="+", type=int, default=[10_000, 100_000, 1_000_000])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--name", default="stream_memory")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.set)))
        return 0
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    results = []
    for steps in args.steps:
        cmd = [sys.executable, "-m", "benchmarks.stream_memory", "--worker", str(steps),
               *[a for s in args.set for a in ("--set", s)]]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(r)
        print(f"{r['steps']:>9} steps: peak RSS {r['peak_rss_mb']:.1f} MB (segment worker "
              f"{_mb(r['segment_worker_peak_rss_mb'])}), {r['steps_per_s']:.0f} steps/s "
              f"(learner {r['learner_steps_per_s']:.0f}, after its first window {_n(r.get('steady_steps_per_s'))}), "
              f"x{r['realtime_factor']:.2f} real time, "
              f"{r['wall_s']:.0f} s", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {"threads": args.threads, "overrides": args.set, "command": " ".join(sys.argv)}
    (OUT / f"{args.name}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    lo = min(r["peak_rss_mb"] for r in results)
    workers = [r.get("segment_worker_peak_rss_mb") for r in results]
    lo_worker = min((w for w in workers if w), default=None)
    lines = ["| steps | peak RSS (MB) | vs smallest | segment worker's peak RSS (MB) | vs smallest | steps/s (run) "
             "| steps/s (learner) | steps/s (learner, median window after the first) | real-time factor | wall (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['steps']:,} | {r['peak_rss_mb']:.1f} | {100 * (r['peak_rss_mb'] / lo - 1):+.1f} % | "
              f"{_mb(w)} | {'-' if not w else f'{100 * (w / lo_worker - 1):+.1f} %'} | "
              f"{r['steps_per_s']:.0f} | {r['learner_steps_per_s']:.0f} | {_n(r.get('steady_steps_per_s'))} | "
              f"{r['realtime_factor']:.2f} | {r['wall_s']:.0f} |"
              for r, w in zip(results, workers)]
    (OUT / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
