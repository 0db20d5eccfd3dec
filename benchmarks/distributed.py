"""Data-parallel DECOLLE on torch.distributed: throughput and communication, 1 and 2 processes.

    OMP_NUM_THREADS=1 ./dev run python -m benchmarks.distributed [--batches 20] [--warmup 2]
        [--repeats 3] [--threads 1] [--every 10 60] [--processes 2] [--set key=value ...]
        [--out benchmarks/results]

Trains the default configuration (``threefactor train`` with no arguments: the embedded motion
dataset's default network, T = 60 steps with 10 of burn-in, global batch 32) on the cpu for
``--batches`` batches after ``--warmup`` batches, exactly as the trainer does: every global
batch is split into contiguous shares, one per process, and the models are kept in step by
``threefactor.run.collective.Synchroniser`` (gloo on 127.0.0.1). Configurations:

- 1 process (no process group);
- N processes, ``exact``: the gradients all-reduced before every optimiser step (one flat buffer);
- N processes, ``periodic`` with K in ``--every``: the weights averaged every K optimiser steps.

Each configuration and repeat is a fresh ``torchrun`` launch (a fresh process group) with
``--threads`` threads per process. Throughput is sample-steps per second over the whole global
batch (samples x all T steps, burn-in included), timed between two barriers; communication is
the wall time inside the synchroniser's all-reduce calls (waiting for the slower process
included), per optimiser step, on every process; and, apart, the exact mode's all-reduce alone
(``--isolated`` of them, each after a barrier: the exchange without the waiting). Writes ``distributed.json`` and
``distributed.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _harness as H  # noqa: E402


# --- one process of one launch ------------------------------------------------------------------


def worker(spec: dict) -> None:
    import torch

    from threefactor import distributed as D
    from threefactor.config import load_config
    from threefactor.model.init import lsuv_init
    from threefactor.model.network import build_network
    from threefactor.rules import make_rule
    from threefactor.run.from_config import load_split, make_optimizer

    torch.set_num_threads(spec["threads"])
    n_batches = spec["warmup"] + spec["batches"]
    cfg = load_config(spec.get("config"), [
        *spec["set"], "device=cpu", "train.progress=false", f"train.batch_size={spec['batch_size']}",
        f"data.n_train={n_batches * spec['batch_size']}", f"distributed.sync={spec['sync']}",
        f"distributed.average_every={spec['every'] or 50}",
    ])
    info, device = D.init_from_env(torch.device("cpu"))
    torch.manual_seed(cfg.seed)
    data = load_split(cfg, "train")
    network = build_network(cfg.network, data.input_shape, len(data.classes), cfg.seed).to(device)
    if cfg.network.init == "lsuv":
        lsuv_init(network, data.frames[:64].to(device, torch.float32), cfg.network.init_target_mean,
                  skip_steps=cfg.rule.burn_in)
    if info.enabled:
        D.broadcast_module(network)
    optimizer = make_optimizer(cfg, network)
    rule = make_rule(cfg, network, optimizer)
    sync = D.Synchroniser(optimizer, info, cfg.distributed.sync, cfg.distributed.average_every)
    if info.rank:
        torch.manual_seed(D.rank_seed(cfg.seed, info.rank))
    network.train()
    B, T = cfg.train.batch_size, cfg.data.timesteps
    lo, hi = D.shard(B, info.rank, info.world_size)
    sync.weight = hi - lo

    def barrier() -> None:
        if info.enabled:
            import torch.distributed as dist

            dist.barrier()

    def train_batch(b: int) -> None:
        idx = torch.arange(b * B, (b + 1) * B)[lo:hi]
        x = data.frames[idx].to(device, torch.float32)
        y = data.labels[idx].to(device)
        before = sync.steps
        rule.train_sequence(x, y)
        if info.enabled and sync.steps == before:
            raise SystemExit(f"rule {cfg.rule.name!r} stepped the optimiser without optimizer.step(): "
                             "its hooks never ran, so nothing was synchronised")

    for b in range(spec["warmup"]):
        train_batch(b)
    barrier()
    sync.steps, sync.collectives, sync.bytes, sync.seconds = 0, 0, 0, 0.0
    times = []
    t0 = time.perf_counter()
    for b in range(spec["warmup"], n_batches):
        t = time.perf_counter()
        train_batch(b)
        times.append(time.perf_counter() - t)
    barrier()
    elapsed = time.perf_counter() - t0
    mine = {**sync.stats(), "elapsed_s": elapsed, "samples_here": hi - lo}
    isolated = None
    if info.enabled:
        # The exchange alone: the exact mode's flat buffer, each all-reduce after a barrier, so
        # no waiting for a slower process is in it.
        import torch.distributed as dist

        buf = torch.zeros(sync.numel + len(sync.params) + 1)
        samples = []
        for _ in range(spec["isolated"]):
            dist.barrier()
            t = time.perf_counter()
            dist.all_reduce(buf)
            samples.append(time.perf_counter() - t)
        isolated = H.summarise([1e3 * v for v in samples])
    ranks = D.all_gather_object(mine) if info.enabled else [mine]
    if info.is_main:
        H.emit({
            "processes": info.world_size,
            "elapsed_s": elapsed,
            "batch_s": times,
            "sample_steps_per_s": spec["batches"] * B * T / elapsed,
            "optimizer_steps": mine["optimizer_steps"],
            "per_process": ranks,
            "threads": torch.get_num_threads(),
            "timesteps": T,
            "global_batch": B,
            "parameters": sum(p.numel() for p in network.parameters()),
            "isolated_all_reduce_ms": isolated,
        })
    D.teardown()


# --- the launches -------------------------------------------------------------------------------


def launch(spec: dict, processes: int, threads: int, timeout: float = 1800.0) -> dict:
    """One fresh launch: a plain interpreter for 1 process, torchrun (gloo, 127.0.0.1) for more."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join([str(H.ROOT), str(H.ROOT / "src"), env.get("PYTHONPATH", "")])
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if "GLOO_SOCKET_IFNAME" not in env and Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"
    cmd = H.launch_command(processes, ["-m", "benchmarks.distributed", "--worker", json.dumps(spec)])
    try:
        proc = subprocess.run(cmd, cwd=H.ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(H.RESULT_TAG):
            return json.loads(line[len(H.RESULT_TAG):])
    # The workers' own last words, not torchrun's report around them.
    lines = [l for l in (proc.stderr or proc.stdout).splitlines() if l.strip()]
    own = [l for l in lines if not l.startswith((" ", "[", "=", "W1", "E1", "I1", "Traceback", "torch."))]
    return {"error": f"exit {proc.returncode}: " + " | ".join((own or lines)[-2:])}


def _summary(name: str, processes: int, sync: str | None, every: int | None, runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    row = {"name": name, "processes": processes, "sync": sync, "average_every": every,
           "errors": [r["error"] for r in runs if "error" in r]}
    if not ok:
        return row
    steps = ok[0]["optimizer_steps"]
    row.update({
        "threads_per_process": ok[0]["threads"],
        "sample_steps_per_s": H.summarise([r["sample_steps_per_s"] for r in ok]),
        "optimizer_steps_per_process": steps,
        # process 0's view, and the worst process's (the time the slowest one waited)
        "communication_ms_per_step": H.summarise([r["per_process"][0]["communication_ms_per_step"] for r in ok]),
        "communication_ms_per_step_max_process": H.summarise(
            [max(p["communication_ms_per_step"] for p in r["per_process"]) for r in ok]),
        "communication_share": H.summarise(
            [r["per_process"][0]["communication_s"] / r["elapsed_s"] for r in ok]),
        "collectives_per_step": ok[0]["per_process"][0]["collectives"] / max(steps, 1),
        "kb_per_step": 1024 * ok[0]["per_process"][0]["communicated_mb"] / max(steps, 1),
        "parameters": ok[0]["parameters"],
    })
    if ok[0].get("isolated_all_reduce_ms"):
        row["isolated_all_reduce_ms"] = H.summarise([r["isolated_all_reduce_ms"]["median"] for r in ok])
    return row


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "sample_steps_per_s" in r]
    names = [r["name"].replace(", ", "\n") for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    thr = [r["sample_steps_per_s"]["median"] for r in rows]
    lo = [t - r["sample_steps_per_s"]["min"] for t, r in zip(thr, rows)]
    hi = [r["sample_steps_per_s"]["max"] - t for t, r in zip(thr, rows)]
    colors = ["#777777"] + ["#1f77b4" if r["sync"] == "exact" else "#ff7f0e" for r in rows[1:]]
    a.bar(names, thr, yerr=[lo, hi], color=colors, capsize=4)
    a.set_ylabel("sample-steps / s (median, min-max)")
    a.set_title("training throughput")
    comm = [r["communication_ms_per_step"]["median"] for r in rows]
    b.bar(names, comm, color=colors)
    for i, r in enumerate(rows):
        b.text(i, comm[i], f"{r['collectives_per_step']:.2f} coll./step", ha="center", va="bottom", fontsize=8)
    b.set_ylabel("ms per optimiser step (process 0)")
    b.set_title("time inside the synchronising all-reduce")
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="a YAML file or preset (default: the default run)")
    p.add_argument("--set", action="append", default=[], help="config override KEY=VALUE (repeatable)")
    p.add_argument("--batches", type=int, default=20, help="timed global batches per launch")
    p.add_argument("--warmup", type=int, default=2, help="untimed global batches first")
    p.add_argument("--batch-size", type=int, default=32, help="global batch (all processes together)")
    p.add_argument("--repeats", type=int, default=3, help="fresh launches per configuration")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--processes", type=int, default=2, help="processes of the multi-process configurations")
    p.add_argument("--every", type=int, nargs="+", default=[10, 60], help="K of the periodic configurations")
    p.add_argument("--isolated", type=int, default=50,
                   help="all-reduces of the exact mode's buffer timed alone (after a barrier each)")
    p.add_argument("--out", type=Path, default=H.ROOT / "benchmarks" / "results")
    p.add_argument("--name", default="distributed")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return {}

    n = args.processes
    configs = [("1 process", 1, None, None), (f"{n} processes, exact", n, "exact", None)]
    configs += [(f"{n} processes, periodic K={k}", n, "periodic", k) for k in args.every]
    base = {"config": args.config, "set": args.set, "batches": args.batches, "warmup": args.warmup,
            "batch_size": args.batch_size, "threads": args.threads, "isolated": args.isolated}
    rows = []
    for name, procs, sync, every in configs:
        spec = {**base, "sync": sync or "exact", "every": every}
        runs = [launch(spec, procs, args.threads) for _ in range(args.repeats)]
        row = _summary(name, procs, sync, every, runs)
        rows.append(row)
        if "sample_steps_per_s" in row:
            alone = row.get("isolated_all_reduce_ms")
            print(f"{name:<28} {row['sample_steps_per_s']['median']:9.0f} sample-steps/s  "
                  f"comm {row['communication_ms_per_step']['median']:7.3f} ms/step "
                  f"({row['collectives_per_step']:.3f} all-reduce/step, {row['kb_per_step']:.1f} KiB/step, "
                  f"{100 * row['communication_share']['median']:.0f}% of the time"
                  + (f"; one all-reduce alone {alone['median']:.3f} ms" if alone else "") + ")", flush=True)
        else:
            print(f"{name:<28} failed: {row['errors'][:1]}", flush=True)
    single = rows[0].get("sample_steps_per_s", {}).get("median")
    for row in rows:
        if single and "sample_steps_per_s" in row:
            row["speedup_vs_1_process"] = row["sample_steps_per_s"]["median"] / single
    result = {
        "benchmark": "distributed",
        "machine": H.machine_info(args.threads),
        "settings": {**{k: v for k, v in base.items()}, "repeats": args.repeats, "processes": n,
                     "backend": "gloo", "address": "127.0.0.1",
                     "threads_per_process": args.threads,
                     "cores_per_process": "shared: all processes on the machine's cores, "
                                          f"{args.threads} torch thread(s) each"},
        "results": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    H.write_json(args.out / f"{args.name}.json", result)
    try:
        m = result["machine"]
        _plot(rows, args.out / f"{args.name}.png",
              f"default network, global batch {args.batch_size}, {args.threads} thread(s)/process, "
              f"{m['cores_available']} cores available ({m['cpu_model']})")
    except ImportError:
        print("plot skipped: matplotlib is not installed")
    print(f"wrote {args.out / (args.name + '.json')}")
    return result


if __name__ == "__main__":
    main()
