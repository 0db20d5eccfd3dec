"""Peak memory of one training sequence against its length T, for DECOLLE, S-TLLR and BPTT.

    OMP_NUM_THREADS=2 ./dev run python -m benchmarks.memory [--rules decolle stllr bptt]
        [--batches 1 8] [--steps 50 100 200 400 800 1800] [--max-gb 6] [--max-run-s 400]
        [--threads 2] [--precision fp32|bf16] [--out benchmarks/results] [--name memory]

On the paper's DvsGesture network (2x32x32 input, conv 7x7 64-128-128, pool 2-1-2, 11
classes; S-TLLR on the same stack with soft-reset LIF neurons), every point is one call of
``rule.train_sequence`` (rules from ``threefactor.rules.make_rule``, burn-in 0) on random events
of 2 % density, in a fresh subprocess. On CPU the main figure, ``training_growth_mb``, is the
training's own memory: the peak RSS during ``train_sequence`` (VmHWM, reset just before it,
after a 2-step warm-up that maps the kernels' code and scratch) minus the RSS just before it, so
the model, the optimiser state and the input tensor (B x T x 2 x 32 x 32 float32, which grows with T for every rule and is data, not
training state) are not counted. ``delta_mb`` is the whole process's peak (``ru_maxrss``)
minus the median peak of baseline subprocesses that only build the same model and optimiser,
input and its temporaries included. On a GPU it is ``torch.cuda.max_memory_allocated`` minus
what the model holds before the sequence.

A point is skipped (and said so in the JSON) when a linear extrapolation from the two points
before it predicts more than ``--max-gb`` or more than ``--max-run-s`` seconds: the machine is
shared. Writes ``memory.json`` and ``memory.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _harness as H  # noqa: E402

MODULE = "benchmarks.memory"
MB = 2**20


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def worker(spec: dict) -> dict:
    import torch

    H.worker_setup(spec["threads"], spec.get("allocator", "default"))
    net = H.NETWORKS[spec["net"]]
    device = torch.device(spec.get("device", "cpu"))
    network, optimizer, rule = H.build_ours(net, spec["rule"], precision=spec.get("precision", "fp32"),
                                            **spec.get("options", {}))
    network.to(device)
    network.train()
    if spec.get("baseline"):
        return {"peak_rss_mb": _peak_rss_bytes() / MB,
                "cuda_allocated_mb": torch.cuda.memory_allocated() / MB if device.type == "cuda" else None}
    batch, steps = spec["batch"], spec["steps"]
    x = H.random_events(batch, steps, net.input_shape, seed=2).to(device)
    labels = H.random_labels(batch, net.n_classes).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    # Two warm-up steps first: the first use of every kernel maps code and scratch buffers
    # (~15 MB, the same at any T) that would otherwise count as the sequence's memory.
    rule.train_sequence(x[:, :2], labels)
    rss_before = H.reset_peak_rss()
    t0 = time.perf_counter()
    rule.train_sequence(x, labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    hwm = H.status_mb("VmHWM")
    out = {"peak_rss_mb": _peak_rss_bytes() / MB, "elapsed_s": elapsed,
           "input_mb": x.numel() * x.element_size() / MB, "rule_class": type(rule).__name__,
           "rss_before_training_mb": rss_before,
           "training_growth_mb": None if rss_before is None or hwm is None else hwm - rss_before}
    if device.type == "cuda":
        out["cuda_peak_mb"] = (torch.cuda.max_memory_allocated() - before) / MB
    return out


def _extrapolate(points: list[tuple[int, float]], t: int) -> float | None:
    """Linear prediction at ``t`` from the last two (T, value) points (None with fewer)."""
    if len(points) < 2:
        return points[-1][1] * t / points[-1][0] if points else None
    (t1, v1), (t2, v2) = points[-2], points[-1]
    slope = (v2 - v1) / (t2 - t1) if t2 != t1 else 0.0
    return v2 + max(slope, 0.0) * (t - t2)


def measure(args) -> dict:
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    rules = args.rules

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    base_spec = {"net": args.net, "threads": args.threads, "device": device, "baseline": True,
                 "allocator": args.allocator, "precision": args.precision}
    baselines = {}
    for rule in rules:
        vals = []
        for _ in range(args.baseline_repeats):
            r = H.run_worker(MODULE, {**base_spec, "rule": rule}, args.threads)
            key = "cuda_allocated_mb" if device == "cuda" else "peak_rss_mb"
            if key in r and r[key] is not None:
                vals.append(r[key])
        baselines[rule] = H.summarise(vals)
        log(f"baseline {rule}: {baselines[rule]['median']} MB (spread {baselines[rule]['spread']})")

    rows = []
    t_all = time.perf_counter()
    for rule in rules:
        base = baselines[rule]["median"] or 0.0
        for batch in args.batches:
            mem_pts: list[tuple[int, float]] = []
            time_pts: list[tuple[int, float]] = []
            for steps in args.steps:
                row = {"rule": rule, "batch": batch, "steps": steps}
                pred_mb = _extrapolate(mem_pts, steps)
                pred_s = _extrapolate(time_pts, steps)
                if pred_mb is not None and pred_mb > args.max_gb * 1024:
                    row["skipped"] = f"predicted {pred_mb / 1024:.1f} GB > --max-gb {args.max_gb}"
                elif pred_s is not None and pred_s > args.max_run_s:
                    row["skipped"] = f"predicted {pred_s:.0f} s > --max-run-s {args.max_run_s:.0f}"
                if "skipped" in row:
                    row["predicted_delta_mb"] = pred_mb
                    rows.append(row)
                    log(f"{rule:7s} B={batch} T={steps}: skipped ({row['skipped']})")
                    continue
                spec = {"net": args.net, "threads": args.threads, "device": device, "rule": rule,
                        "allocator": args.allocator, "precision": args.precision,
                        "batch": batch, "steps": steps}
                repeats = args.repeats if (pred_s or 0) < args.repeat_below_s else 1
                runs = [H.run_worker(MODULE, spec, args.threads, timeout=max(3 * args.max_run_s, 600))
                        for _ in range(repeats)]
                good = [r for r in runs if "error" not in r]
                if not good:
                    row["error"] = runs[0].get("error")
                    rows.append(row)
                    log(f"{rule:7s} B={batch} T={steps}: error {row['error']}")
                    continue
                key = "cuda_peak_mb" if device == "cuda" else "peak_rss_mb"
                deltas = [r[key] - (0.0 if device == "cuda" else base) for r in good]
                d = H.summarise(deltas)
                row.update({
                    "delta_mb": d, "peak_mb": H.summarise([r[key] for r in good]),
                    "input_mb": good[0]["input_mb"],
                    "delta_minus_input_mb": d["median"] - (0.0 if device == "cuda" else good[0]["input_mb"]),
                    "training_growth_mb": H.summarise([r["training_growth_mb"] for r in good
                                                       if r.get("training_growth_mb") is not None]),
                    "elapsed_s": H.summarise([r["elapsed_s"] for r in good]),
                    "rule_class": good[0]["rule_class"],
                })
                rows.append(row)
                mem_pts.append((steps, d["median"]))
                time_pts.append((steps, row["elapsed_s"]["median"]))
                g = row["training_growth_mb"]["median"]
                log(f"{rule:7s} B={batch} T={steps}: +{d['median']:.0f} MB "
                    f"({row['delta_minus_input_mb']:.0f} MB without input; training alone "
                    f"{'n/a' if g is None else f'{g:.1f}'} MB), {row['elapsed_s']['median']:.1f} s")
    return {
        "benchmark": "memory",
        "command": " ".join(["python -m benchmarks.memory", *sys.argv[1:]]),
        "machine": H.machine_info(args.threads),
        "device": device,
        "measure": ("torch.cuda.max_memory_allocated during the sequence minus memory allocated before it"
                    if device == "cuda" else
                    "ru_maxrss of the subprocess minus the median ru_maxrss of subprocesses that only "
                    "build the model and optimiser"),
        "settings": {"net": args.net, "rules": rules, "batches": args.batches, "steps": args.steps,
                     "threads": args.threads, "allocator": args.allocator, "precision": args.precision,
                     "max_gb": args.max_gb, "max_run_s": args.max_run_s,
                     "rule_settings": "make_rule defaults with burn-in 0, smooth L1, Adamax; decolle/bptt: "
                                      "fast_sigmoid, lagged P, dropout 0.5, decolle in closed form; stllr: soft-reset LIF, "
                                      "vision factors, backprop learning signal, update every step"},
        "baseline_mb": baselines,
        "results": rows,
        "wall_s": time.perf_counter() - t_all,
    }


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"decolle": "C0", "stllr": "C2", "bptt": "C3"}
    styles = {b: s for b, s in zip(sorted({r["batch"] for r in data["results"]}), ("-o", "--s", ":^", "-.v"))}
    for ax, key, title in ((axes[0], "training_growth", "memory of training alone (peak during the sequence)"),
                           (axes[1], "delta", "whole process minus model (input included)")):
        for rule in data["settings"]["rules"]:
            for batch in data["settings"]["batches"]:
                sel = [r for r in data["results"] if r["rule"] == rule and r["batch"] == batch and "delta_mb" in r
                       and (key == "delta" or (r.get("training_growth_mb") or {}).get("median") is not None)]
                if not sel:
                    continue
                xs = [r["steps"] for r in sel]
                ys = [r["delta_mb"]["median"] if key == "delta" else r["training_growth_mb"]["median"] for r in sel]
                ax.plot(xs, [max(y, 1.0) for y in ys], styles[batch], color=colors.get(rule),
                        label=f"{rule}, batch {batch}")
                skipped = [r for r in data["results"] if r["rule"] == rule and r["batch"] == batch
                           and "skipped" in r and r.get("predicted_delta_mb")]
                if skipped and key == "delta":
                    ax.plot([r["steps"] for r in skipped], [r["predicted_delta_mb"] for r in skipped], "x",
                            color=colors.get(rule), alpha=0.6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T (steps)")
        ax.set_ylabel("MB")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    m = data["machine"]
    fig.suptitle(f"DvsGesture network; {m['cpu_model']}, torch {m['torch']}, {data['device']} "
                 f"(x: skipped, extrapolated)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(data: dict) -> str:
    lines = ["rule     batch      T  training MB   process MB  (-input)   time s"]
    for r in data["results"]:
        if "delta_mb" in r:
            g = (r.get("training_growth_mb") or {}).get("median")
            lines.append(f"{r['rule']:8s} {r['batch']:5d} {r['steps']:6d} "
                         f"{'n/a' if g is None else f'{g:.1f}':>12s} {r['delta_mb']['median']:12.0f} "
                         f"{r['delta_minus_input_mb']:9.0f} {r['elapsed_s']['median']:8.1f}")
        else:
            lines.append(f"{r['rule']:8s} {r['batch']:5d} {r['steps']:6d}   {r.get('skipped') or r.get('error')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--net", default="dvsgesture", choices=sorted(H.NETWORKS))
    p.add_argument("--rules", nargs="+", default=["decolle", "stllr", "bptt"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--steps", nargs="+", type=int, default=[50, 100, 200, 400, 800, 1800])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--allocator", default="default", choices=H.ALLOCATORS,
                   help="malloc policy of every run: default (glibc as it is) or retain (as "
                        "threefactor.run.from_config runs, allocator.retain_freed_memory) (default)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="train.precision of every rule (fp32; bf16: bf16 products, fp32 master weights)")
    p.add_argument("--max-gb", type=float, default=6.0, help="skip points predicted above this (6)")
    p.add_argument("--max-run-s", type=float, default=400.0, help="skip points predicted to run longer (400)")
    p.add_argument("--repeats", type=int, default=2, help="runs per point when it is quick (2)")
    p.add_argument("--repeat-below-s", type=float, default=30.0, help="repeat only points predicted under this")
    p.add_argument("--baseline-repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=H.ROOT / "benchmarks" / "results")
    p.add_argument("--name", default="memory")
    args = p.parse_args(argv)
    if args.worker:
        try:
            H.emit(worker(json.loads(args.worker)))
        except Exception as err:  # noqa: BLE001
            H.emit({"error": f"{type(err).__name__}: {err}"})
        return None
    data = measure(args)
    H.write_json(args.out / f"{args.name}.json", data)
    try:
        plot(data, args.out / f"{args.name}.png")
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
    print(table(data))
    return data


if __name__ == "__main__":
    main()
