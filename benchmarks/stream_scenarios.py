"""Continual learning on non-stationary streams: DECOLLE against a frozen network and truncated BPTT.

    ./dev run python -m benchmarks.stream_scenarios [--phase-segments 60] [--segments 300]
        [--bptt-window 20] [--scenarios class_incremental domain_shift sparse_labels]
        [--methods decolle frozen tbptt] [--parallel 1] [--segment-ms 100] [--threads 1]
        [--name stream_scenarios]

Every run is ``threefactor stream`` on the endless motion stream (the ``stream`` preset: the
small network, batch 1, state never reset) with one scenario:

- ``class_incremental``: four phases of ``phase_segments`` segments, two new classes each;
  after every phase the network (at rest, no learning) classifies a fixed probe set of 8
  segments per class of every phase so far, which gives the forgetting (best earlier accuracy
  of a phase's classes minus the final one, averaged over the phases but the last).
- ``domain_shift``: ``segments`` segments; from the middle on the motion is twice as fast; the
  recovery time is the stream time until the windowed accuracy is back within 5 points of its
  level in the 5 windows before the shift.
- ``sparse_labels``: ``segments`` segments, 10 % of them labelled (the rest judged, not learned).

A warning the measures need: within a segment the class does not change, so the prequential
accuracy also rewards following the current label (a *no-change classifier*, which predicts
the last label it was given, scores near 100 % on such a stream). The table therefore also
gives that classifier's score and the accuracy on held-out probe segments at the end (from
rest, no learning), which is what the network generalises to.

Methods on the same stream: ``decolle`` (learns at every labelled step), ``frozen`` (the same,
frozen after the first ``phase_segments`` segments), ``tbptt`` (BPTT truncated to windows of
``bptt_window`` steps, state carried over). Measures: average (prequential) accuracy of the
last layer over the whole stream, forgetting, recovery time.

``--parallel N`` runs N streams of the same scenario side by side as one batch
(``stream.parallel``; different seeds, segments of ``--segment-ms`` each, one network state per
stream): the network sees N segments per step instead of one. A batch is learned from only where
every stream is labelled, so ``sparse_labels`` is not meaningful with N > 1 (it would almost
never learn) and is skipped. Writes
``benchmarks/results/stream/<name>.json``, ``.md`` and one PNG of the running accuracy per
scenario.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "stream"
PROBE_MS = 100


class Until:
    """``source`` up to (not including) segment ``end``; seeks pass through."""

    def __init__(self, source, end: int) -> None:
        self.source, self.end = source, end
        self.dt_us = getattr(source, "dt_us", 1000)
        self.runs_apart = getattr(source, "runs_apart", False)  # made in a worker process as it would be
        self.classes, self.sensor_size = source.classes, source.sensor_size

    def seek(self, segment: int, start_us: int) -> None:
        self.source.seek(segment, start_us)

    def __iter__(self):
        return self

    def __next__(self):
        if self.source.next_index >= self.end:
            raise StopIteration
        return next(self.source)


def probe(network, classes: list[int], seed: int) -> float:
    """Last-layer accuracy of ``network`` at rest over 8 probe segments per class of ``classes``."""
    from threefactor.rules.common import predict_sequence
    from threefactor.stream.sources import MotionStream, Scenario

    source = MotionStream(seed, PROBE_MS, PROBE_MS, downsample=2, scenario=Scenario(phases=((0, tuple(classes)),)))
    correct = total = 0
    was = network.training
    network.eval()
    for _ in range(8 * len(classes)):
        seg = next(source)
        res = predict_sequence(network, seg.frames[None], None, burn_in=10)
        correct += int(res.votes[-1, 0].argmax() == seg.truth)
        total += 1
    network.train(was)
    return correct / total


def streams_of(source) -> list:
    """The single streams of ``source`` (those of a ``ParallelStreams``, or itself)."""
    return list(getattr(source, "sources", [source]))


def no_change_accuracy(source, n_segments: int) -> float:
    """The prequential accuracy of the no-change classifier on the same stream: it predicts the
    last label it was given (Zliobaite 2015), so it errs only at the first step of a segment
    whose class differs, and on steps after unlabelled segments of another class. Parallel
    streams: the mean over the streams."""
    streams = streams_of(source)
    return sum(_no_change_one(s, n_segments) for s in streams) / len(streams)


def _no_change_one(source, n_segments: int) -> float:
    correct = total = 0
    last = None
    for k in range(n_segments):
        label, steps, labelled, _ = source.plan(k)
        truth = label
        correct += steps if last == truth else steps - 1 if labelled else 0
        if labelled:
            last = truth
        total += steps
    return correct / total


def run(scenario: str, method: str, args, root: Path) -> dict:
    from threefactor.config import load_config
    from threefactor.stream.from_config import build_stream
    from threefactor.stream.learner import read_rows
    from threefactor.stream.measures import average_accuracy, forgetting, recovery_time

    p = args.phase_segments
    n_segments = 4 * p if scenario == "class_incremental" else args.segments
    overrides = [f"stream.scenario={scenario}", f"stream.phase_segments={p}", "train.progress=false",
                 "train.plots=false", "device=cpu", "stream.steps=null", f"stream.shift_at_segment={n_segments // 2}",
                 f"seed={args.seed}"]
    if args.parallel > 1:
        overrides += [f"stream.parallel={args.parallel}", f"stream.min_ms={args.segment_ms}",
                      f"stream.max_ms={args.segment_ms}"]
    if method == "frozen":
        overrides.append(f"stream.learn_until_segment={p}")
    if method == "tbptt":
        overrides += ["rule.name=bptt", f"rule.bptt_window={args.bptt_window}", "rule.loss_layers=all"]
    cfg = load_config("stream", overrides)
    out = root / f"{scenario}-{method}"
    learner, source = build_stream(cfg, out, log=lambda m: None)
    t0 = time.perf_counter()
    probes: list[dict] = []
    if scenario == "class_incremental":
        for phase in range(4):
            learner.run(Until(source, (phase + 1) * p), None, resume=phase > 0)
            probes.append({f"classes {2 * k}-{2 * k + 1}": probe(learner.network, [2 * k, 2 * k + 1], 10_000 + args.seed)
                           for k in range(phase + 1)})
    else:
        learner.run(Until(source, n_segments), None)
    wall = time.perf_counter() - t0
    # what the network generalises to: held-out segments of every class, from rest, no learning
    # (the prequential accuracy also counts how fast it follows a segment's constant label)
    final_probe = probe(learner.network, list(range(8)), 10_000 + args.seed)
    rows = read_rows(out)
    first = streams_of(source)[0]  # parallel streams share their segment boundaries
    result = {"scenario": scenario, "method": method, "steps": rows[-1]["step"], "wall_s": wall,
              "average_accuracy": average_accuracy(rows), "final_probe_accuracy": final_probe,
              "no_change_accuracy": no_change_accuracy(source, rows[-1]["segment"]), "rows": rows}
    if scenario == "class_incremental":
        result["probes"] = probes
        result["forgetting"] = forgetting(probes)
        result["final_probe_all_classes"] = sum(probes[-1].values()) / len(probes[-1])
        result["marks"] = [(first.start_of(k * p) / 1e6, f"phase {k + 1}") for k in range(1, 4)]
    if scenario == "domain_shift":
        shift_s = first.start_of(n_segments // 2) / 1e6
        result["shift_s"] = shift_s
        result["recovery_s"] = recovery_time(rows, shift_s, tolerance=0.05)
        result["marks"] = [(shift_s, "2x faster")]
        before = [r for r in rows if r["time_s"] <= shift_s]
        after = [r for r in rows if r["time_s"] > shift_s]
        result["accuracy_before_shift"] = average_accuracy(before)
        result["accuracy_after_shift"] = average_accuracy(after)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenarios", nargs="+", default=["class_incremental", "domain_shift", "sparse_labels"])
    p.add_argument("--methods", nargs="+", default=["decolle", "frozen", "tbptt"])
    p.add_argument("--phase-segments", type=int, default=60)
    p.add_argument("--segments", type=int, default=300)
    p.add_argument("--bptt-window", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parallel", type=int, default=1, help="streams side by side as one batch (stream.parallel)")
    p.add_argument("--segment-ms", type=int, default=100, help="segment length with --parallel > 1")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="stream_scenarios")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import tempfile


    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for scenario in args.scenarios:
            if args.parallel > 1 and scenario == "sparse_labels":
                print("sparse_labels skipped: with --parallel > 1 a batch learns only where every stream is "
                      "labelled", flush=True)
                continue
            for method in args.methods:
                r = run(scenario, method, args, Path(tmp))
                results.append(r)
                extra = "".join(f", {k} {r[k]:.3f}" for k in ("forgetting", "recovery_s") if r.get(k) is not None)
                print(f"{scenario:18s} {method:8s} average accuracy {r['average_accuracy']:.3f}{extra} "
                      f"({r['steps']} steps, {r['wall_s']:.0f} s)", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    for scenario in args.scenarios:
        runs = [r for r in results if r["scenario"] == scenario]
        if runs:
            plot_scenario(runs, OUT / f"{args.name}_{scenario}.png")
    (OUT / f"{args.name}.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1) + "\n")
    lines = ["| scenario | method | average prequential accuracy (last layer) | held-out probe at the end | "
             "forgetting (probes) | recovery after the shift | no-change classifier | steps | wall |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        f = f"{100 * r['forgetting']:.1f} points" if r.get("forgetting") is not None else "-"
        rec = ("-" if r["scenario"] != "domain_shift" else
               "never" if r.get("recovery_s") is None else f"{r['recovery_s']:.1f} s")
        lines.append(f"| {r['scenario']} | {r['method']} | {100 * r['average_accuracy']:.1f} % | "
                     f"{100 * r['final_probe_accuracy']:.1f} % | {f} | {rec} | {100 * r['no_change_accuracy']:.1f} % | "
                     f"{r['steps']:,} | {r['wall_s']:.0f} s |")
    (OUT / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def plot_scenario(runs: list[dict], path: Path) -> None:
    from threefactor.report.plots import new_figure, save_figure

    fig = new_figure(8, 3.2)
    ax = fig.subplots()
    for r in runs:
        judged = [row for row in r["rows"] if row.get("accuracy") is not None]
        ax.plot([row["time_s"] for row in judged], [100 * row["accuracy"][-1] for row in judged], lw=1, label=r["method"])
    for t, text in runs[0].get("marks", []):
        ax.axvline(t, color="grey", ls="--", lw=0.8)
        ax.text(t, 101, text, fontsize=7)
    ax.set(xlabel="stream time (s)", ylabel="last layer, accuracy per window (%)", ylim=(0, 100),
           title=f"{runs[0]['scenario']}: prequential accuracy")
    ax.legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
