"""Train the same network on the same data with every learning rule; one table of the results.

    OMP_NUM_THREADS=1 python -m benchmarks.compare_rules [--epochs N] [--n-train N] [--n-test N]
        [--timesteps T] [--rules decolle,decolle-et,stllr,bptt,bptt-lif] [--config FILE|PRESET]
        [--set key=value ...] [--out DIR]

Rules (all on the config's layer stack, data, batch size, optimiser and learning rate):
  decolle     DECOLLE (run with rule.error_trigger.threshold=0, which is plain DECOLLE -- a test
              shows it -- so that its fraction of non-zero error signals is counted)
  decolle-et  error-triggered DECOLLE, threshold adapted towards --target-rate error events
  stllr       S-TLLR on the same stack of soft-reset LIF neurons (vision factors by default)
  bptt        BPTT on the DECOLLE network (the same objective as decolle, exact gradient)
  bptt-lif    BPTT on the LIF network of stllr

Each rule runs in a fresh subprocess, so that its peak resident memory (ru_maxrss, Linux: KiB)
is its own; on CUDA the table also gives torch.cuda.max_memory_allocated. "update fraction" is,
per layer, the fraction of (step, sample, neuron) after the burn-in whose learning signal was
non-zero (decolle, stllr) or that sent an error event (decolle-et); BPTT has one update per
sequence. Writes DIR/compare_rules.json and DIR/compare_rules.md and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _harness as H  # noqa: E402

RULES = {
    "decolle": ["rule.name=decolle", "rule.error_trigger.threshold=0"],
    "decolle-et": ["rule.name=decolle"],  # + target rate, added below
    "stllr": ["rule.name=stllr", "network.neuron_model=lif", "rule.reg1=0", "rule.reg2=0"],
    "bptt": ["rule.name=bptt"],
    "bptt-lif": ["rule.name=bptt", "network.neuron_model=lif"],
}


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class _SavedMeter:
    """Peak bytes of tensors saved for backward that are alive at once (saved_tensors_hooks)."""

    def __init__(self) -> None:
        self.live = self.peak = 0

    def pack(self, t):
        return _Saved(self, t)

    @staticmethod
    def unpack(saved):
        return saved.t


class _Saved:
    def __init__(self, meter: _SavedMeter, t) -> None:
        self.meter, self.t, self.bytes = meter, t, t.numel() * t.element_size()
        meter.live += self.bytes
        meter.peak = max(meter.peak, meter.live)

    def __del__(self) -> None:
        self.meter.live -= self.bytes


def _overrides(args) -> list[str]:
    over = [
        f"train.epochs={args.epochs}", f"data.n_train={args.n_train}", f"data.n_test={args.n_test}",
        f"data.timesteps={args.timesteps}", "train.progress=false", f"device={args.device}",
    ]
    return over + list(args.set)


def worker(args) -> dict:
    """One rule, in this process: train, evaluate, measure."""
    import torch

    from threefactor.config import load_config
    from threefactor.model.init import lsuv_init
    from threefactor.model.network import build_network
    from threefactor.rules import make_rule
    from threefactor.run.from_config import evaluate, load_data, make_optimizer, make_scheduler, resolve_device

    name = args.worker
    rule_over = list(RULES[name])
    if name == "decolle-et":
        rule_over.append(f"rule.error_trigger.target_rate={args.target_rate}")
    cfg = load_config(args.config, _overrides(args) + rule_over)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    train_data, test_data = load_data(cfg)
    network = build_network(cfg.network, train_data.input_shape, len(train_data.classes), cfg.seed).to(device)
    if cfg.network.init == "lsuv":
        sample = train_data.frames[: min(64, len(train_data.labels))].to(device, torch.float32)
        lsuv_init(network, sample, cfg.network.init_target_mean, skip_steps=cfg.rule.burn_in)
    optimizer = make_optimizer(cfg, network)
    scheduler = make_scheduler(cfg, optimizer)
    rule = make_rule(cfg, network, optimizer)
    rss_before = H.reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        cuda_before = torch.cuda.memory_allocated(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(train_data.labels)
    fractions, history = [], []
    t0 = time.perf_counter()
    train_time = 0.0
    for epoch in range(1, cfg.train.epochs + 1):
        network.train()
        t_epoch = time.perf_counter()
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, cfg.train.batch_size):
            idx = order[i:i + cfg.train.batch_size]
            x = train_data.frames[idx].to(device, torch.float32)
            y = train_data.labels[idx].to(device)
            res = rule.train_sequence(x, y)
            if not torch.isfinite(res.loss).all():
                raise RuntimeError(f"{name}: loss became {res.loss.tolist()}")
            if res.stats and "update_fraction" in res.stats:
                fractions.append(res.stats["update_fraction"])
        scheduler.step()
        train_time += time.perf_counter() - t_epoch
        accs, _ = evaluate(network, test_data, cfg, device)
        history.append({"epoch": epoch, "test_accuracy": accs})
        print(f"[{name}] epoch {epoch}: test acc " + " ".join(f"L{j + 1} {a:.3f}" for j, a in enumerate(accs))
              + f" ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    result = {
        "rule": name,
        "test_accuracy": history[-1]["test_accuracy"] if history else evaluate(network, test_data, cfg, device)[0],
        "history": history,
        "train_time_s": train_time,
        "wall_time_s": time.perf_counter() - t0,
        "maxrss_mb": _maxrss_mb(),  # of the whole process (data, LSUV included)
        "rss_before_training_mb": rss_before,
        "peak_rss_training_mb": H.status_mb("VmHWM") if rss_before is not None else None,
        "autograd_peak_mb": _autograd_peak_mb(rule, train_data, cfg, device),
        # the mean over the last quarter of the batches (after the threshold has adapted)
        "update_fraction": ([sum(f[j] for f in fractions[-max(len(fractions) // 4, 1):])
                             / len(fractions[-max(len(fractions) // 4, 1):]) for j in range(len(fractions[0]))]
                            if fractions else None),
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["cuda_peak_above_model_mb"] = (torch.cuda.max_memory_allocated(device) - cuda_before) / 2**20
    return result


def _autograd_peak_mb(rule, data, cfg, device) -> float:
    """Peak MB of saved-for-backward tensors during one training batch, measured on a copy of
    the rule (network and optimiser included) so that the trained network is not changed."""
    import copy

    import torch

    probe = copy.deepcopy(rule)
    x = data.frames[: cfg.train.batch_size].to(device, torch.float32)
    y = data.labels[: cfg.train.batch_size].to(device)
    meter = _SavedMeter()
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        probe.train_sequence(x, y)
    return meter.peak / 2**20


def table(results: list[dict], budget: str) -> str:
    n_layers = max(len(r["test_accuracy"]) for r in results)
    cuda = any("cuda_peak_mb" in r for r in results)
    head = (["rule"] + [f"test acc L{j + 1}" for j in range(n_layers)]
            + ["train time (s)", "autograd peak per batch (MB)", "peak RSS in training (MB)",
               "RSS growth in training (MB)"]
            + (["CUDA peak (MB)"] if cuda else []) + ["update fraction per layer"])
    lines = [f"Budget: {budget}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        frac = r["update_fraction"]
        row = ([r["rule"]] + [f"{a:.3f}" for a in r["test_accuracy"]]
               + [f"{r['train_time_s']:.0f}", f"{r['autograd_peak_mb']:.1f}", _mb(r.get("peak_rss_training_mb")),
                  _mb(None if r.get("peak_rss_training_mb") is None
                      else r["peak_rss_training_mb"] - r["rss_before_training_mb"])]
               + ([f"{r.get('cuda_peak_mb', float('nan')):.0f}"] if cuda else [])
               + [" / ".join(f"{f:.3f}" for f in frac) if frac else "1 update per sequence"])
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _mb(v) -> str:
    return "n/a" if v is None else f"{v:.0f}"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare_rules")
    parser.add_argument("--config", help="a YAML file or preset (default: the default config)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--n-train", type=int, default=800)
    parser.add_argument("--n-test", type=int, default=240)
    parser.add_argument("--timesteps", type=int, default=60)
    parser.add_argument("--target-rate", type=float, default=0.05, help="decolle-et: error events per step and neuron")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="runs/compare_rules")
    parser.add_argument("--worker", choices=list(RULES), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        result = worker(args)
        Path(args.result).write_text(json.dumps(result, indent=2))
        return [result]

    names = [r.strip() for r in args.rules.split(",") if r.strip()]
    unknown = [r for r in names if r not in RULES]
    if unknown:
        parser.error(f"unknown rules {unknown}; valid: {', '.join(RULES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    passthrough = ["--epochs", str(args.epochs), "--n-train", str(args.n_train), "--n-test", str(args.n_test),
                   "--timesteps", str(args.timesteps), "--target-rate", str(args.target_rate),
                   "--device", args.device] + [a for s in args.set for a in ("--set", s)]
    if args.config:
        passthrough += ["--config", args.config]
    results = []
    for name in names:
        path = out / f"{name}.json"
        cmd = [sys.executable, "-m", "benchmarks.compare_rules", "--worker", name, "--result", str(path), *passthrough]
        print(f"running {name} ...", flush=True)
        proc = subprocess.run(cmd, env=dict(os.environ))
        if proc.returncode != 0:
            print(f"{name}: failed with exit code {proc.returncode}", file=sys.stderr)
            continue
        results.append(json.loads(path.read_text()))
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    budget = (f"embedded dataset (unless --config says otherwise), {args.n_train} train / {args.n_test} test "
              f"samples, T = {args.timesteps}, {args.epochs} epoch(s), device {args.device}, "
              f"OMP_NUM_THREADS={threads}; extra settings: {args.set or 'none'}; decolle-et target rate "
              f"{args.target_rate}")
    md = table(results, budget) if results else "no results\n"
    (out / "compare_rules.json").write_text(json.dumps({"budget": budget, "results": results}, indent=2))
    (out / "compare_rules.md").write_text(md)
    print(md)
    return results


if __name__ == "__main__":
    main()
