"""Train on simulated N-MNIST, test on real recordings: what the event simulator is worth.

    ./dev run python -m benchmarks.sim2real [--n-sim 20000] [--sim-epochs 4] [--real-epochs 8]
        [--timesteps 100] [--threads 2] [--runs real sim sim_real] [--name default]

Three runs of the ``nmnist-small`` preset's network and settings (3 ms bins, 32 x 32 crop,
conv 16-32-32, DECOLLE), all tested on the 100 real test recordings of
``$THREEFACTOR_DATA/nmnist-small``:

- ``real``: trained on the 1,000 real training recordings alone (the preset as it is);
- ``sim``: trained on ``--n-sim`` recordings simulated from MNIST's training images
  (``SimulatedNMNIST``, ``$THREEFACTOR_DATA/mnist``) for ``--sim-epochs``;
- ``sim_real``: the ``sim`` network fine-tuned on the 1,000 real recordings with the ``real``
  run's recipe (same epochs and learning-rate schedule): only the starting point differs.

Each network is also tested on the simulations of the same 100 test digits (the real test
recordings are MNIST's first 100 test digits): the gap between the two is the domain's. The
simulated recordings are made once and kept as events (about 60 kB each); the count frames
are made per batch through a ``DataLoader``, so 20,000 samples need about 1.2 GB, not the 4 GB
of their frames. Every run goes through ``threefactor.Trainer`` into
``--out/runs/<name>/<run>`` (a run whose ``summary.json`` exists is read, not trained again);
the accuracies, sizes and times go to ``--out/<name>.json``. The defaults take about an hour per
run on 2 CPU cores; a GPU would take the paper's network (``--config nmnist``: 7x7 64-128-128,
T = 300 at 1 ms) and all 60,000 images.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from threefactor.config import Config, dump_config, load_config
from threefactor.data.datasets.simulated_nmnist import SimulatedNMNIST
from threefactor.data.home import resolve_root
from threefactor.data.splits import frame_transform
from threefactor.model.init import lsuv_init
from threefactor.model.network import DecolleNetwork, build_network
from threefactor.rules import make_rule
from threefactor.rules.common import resolve_loss
from threefactor.run.checkpoint import load_checkpoint
from threefactor.run.evaluate import evaluate
from threefactor.run.from_config import FrameBatches, load_data, make_optimizer, make_scheduler
from threefactor.run.trainer import Trainer

RUNS = ("real", "sim", "sim_real")


class EventsInMemory(torch.utils.data.Dataset):
    """The recordings of an event dataset, made (or read) once and kept as events; each access
    gives ``(transform(events) as a tensor, label)``."""

    def __init__(self, dataset, transform, log=print) -> None:
        t0 = time.perf_counter()
        self.events, self.targets = [], np.asarray(dataset.targets)
        for i in range(len(dataset)):
            self.events.append(dataset.checked_events(i)[0])
            if (i + 1) % 2000 == 0:
                log(f"  {i + 1} / {len(dataset)} recordings made ({time.perf_counter() - t0:.0f} s)")
        self.transform = transform
        self.make_s = time.perf_counter() - t0

    def __len__(self) -> int:
        return len(self.events)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(np.asarray(self.transform(self.events[i]))), int(self.targets[i])


def simulated_config(cfg: Config, n_sim: int, mnist: str) -> Config:
    """``cfg`` with its training data simulated from MNIST (what the ``sim`` run's config.yaml says)."""
    return dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, dataset="simulated_nmnist", root=mnist, n_train=n_sim))


def finished(out: Path) -> dict | None:
    """The summary of the run in ``out`` if it has finished before."""
    summary = out / "summary.json"
    return json.loads(summary.read_text()) if summary.exists() else None


def fit(cfg: Config, network: DecolleNetwork, train_batches, test_batches, out: Path, epochs: int,
        meta: dict) -> dict:
    """Train ``network`` with ``cfg``'s rule, optimiser and schedule into ``out`` (or read the
    summary of the run already there)."""
    done = finished(out)
    if done is not None:
        print(f"{out}: finished before, its summary is read")
        return done
    optimizer = make_optimizer(cfg, network)
    trainer = Trainer(
        network, make_rule(cfg, network, optimizer), optimizer, out, epochs=epochs,
        scheduler=make_scheduler(cfg, optimizer), loss=resolve_loss(cfg.rule.loss), burn_in=cfg.rule.burn_in,
        seed=cfg.seed, progress=False, config_text=dump_config(cfg), meta=meta,
    )
    return trainer.fit(train_batches, test_batches)


def new_network(cfg: Config, frames: torch.Tensor, n_classes: int) -> DecolleNetwork:
    """The preset's network, LSUV-initialised on ``frames`` as ``threefactor train`` does."""
    network = build_network(cfg.network, tuple(frames.shape[2:]), n_classes, cfg.seed)
    lsuv_init(network, frames.float(), cfg.network.init_target_mean, skip_steps=cfg.rule.burn_in)
    return network


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sim2real")
    parser.add_argument("--config", default="nmnist-small",
                        help="preset or file: network, rule, optimiser, data framing")
    parser.add_argument("--set", action="append", default=[], help="config overrides, as for threefactor train")
    parser.add_argument("--mnist", default="$THREEFACTOR_DATA/mnist")
    parser.add_argument("--n-sim", type=int, default=20000, help="simulated training recordings (MNIST train images)")
    parser.add_argument("--sim-epochs", type=int, default=4)
    parser.add_argument("--real-epochs", type=int, default=None, help="real-only and fine-tuning epochs (the config's)")
    parser.add_argument("--finetune-lr", type=float, default=None, help="fine-tuning learning rate (the config's)")
    parser.add_argument("--timesteps", type=int, default=None, help="time bins (the config's: 100 x 3 ms)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    parser.add_argument("--out", default="benchmarks/results/sim2real")
    parser.add_argument("--name", default="default")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = list(args.set) + ["train.progress=false", "train.plots=false", "train.tensorboard=false"]
    if args.timesteps:
        overrides.append(f"data.timesteps={args.timesteps}")
    cfg = load_config(args.config, overrides)
    real_epochs = args.real_epochs or cfg.train.epochs
    runs_dir = Path(args.out) / "runs" / args.name
    result = {"config": args.config, "overrides": args.set, "n_sim": args.n_sim, "sim_epochs": args.sim_epochs,
              "real_epochs": real_epochs, "finetune_lr": args.finetune_lr or cfg.optim.lr,
              "timesteps": cfg.data.timesteps, "dt_us": cfg.data.dt_us,
              "threads": args.threads, "runs": {}}
    t0 = time.perf_counter()
    real_train, real_test = load_data(cfg)
    meta = {"classes": list(real_train.classes), "input_shape": list(real_train.input_shape),
            "sensor_size": [int(v) for v in real_train.sensor_size]}
    result["n_real_train"], result["n_real_test"] = len(real_train), len(real_test)
    real_batches = FrameBatches(real_train, cfg.train.batch_size)
    test_batches = FrameBatches(real_test, cfg.train.eval_batch_size, shuffle=False)
    n_classes = len(real_train.classes)

    # The real test recordings are of MNIST's first 100 test digits: their simulations show the
    # gap between the two domains on the very same digits.
    sim_test = SimulatedNMNIST(resolve_root(args.mnist), "test", n=len(real_test), seed=cfg.seed)
    sim_test_batches = torch.utils.data.DataLoader(EventsInMemory(sim_test, frame_transform(
        cfg.data, "test", sim_test.sensor_size, cfg.data.timesteps)), cfg.train.eval_batch_size)

    def record(name: str, summary: dict, started: float, **extra) -> None:
        network, _, _ = load_checkpoint(runs_dir / name / "checkpoint.pt")
        on_sim = evaluate(network, sim_test_batches, resolve_loss(cfg.rule.loss), cfg.rule.burn_in)[0]
        result["runs"][name] = {"test_accuracy": summary.get("test_accuracy"),
                                "simulated_test_accuracy": {f"layer{k + 1}": a for k, a in enumerate(on_sim)},
                                "time_s": time.perf_counter() - started, "run_dir": str(runs_dir / name), **extra}
        print(f"{name}: accuracy per layer on the real test recordings {summary.get('test_accuracy')}, "
              f"on their digits simulated {result['runs'][name]['simulated_test_accuracy']}")
        out = Path(args.out) / f"{args.name}.json"
        out.write_text(json.dumps(result, indent=1) + "\n")

    if "sim" in args.runs or "sim_real" in args.runs:
        sim_cfg = simulated_config(cfg, args.n_sim, args.mnist)
        started = time.perf_counter()
        summary = finished(runs_dir / "sim")
        if summary is None:
            sim = SimulatedNMNIST(resolve_root(args.mnist), "train", n=args.n_sim, seed=cfg.seed)
            # framed as the real training recordings are
            transform = frame_transform(cfg.data, "train", sim.sensor_size, cfg.data.timesteps)
            print(f"simulating {args.n_sim} recordings ...")
            data = EventsInMemory(sim, transform)
            result["simulate_s"] = data.make_s
            loader = torch.utils.data.DataLoader(data, cfg.train.batch_size, shuffle=True)
            torch.manual_seed(cfg.seed)
            network = new_network(sim_cfg, torch.stack([data[i][0] for i in range(64)]), n_classes)
            summary = fit(sim_cfg, network, loader, test_batches, runs_dir / "sim", args.sim_epochs, meta)
            del data, loader
        record("sim", summary, started)
    if "sim_real" in args.runs:
        started = time.perf_counter()
        network, _, _ = load_checkpoint(runs_dir / "sim" / "checkpoint.pt")
        torch.manual_seed(cfg.seed)
        tune_cfg = cfg if args.finetune_lr is None else dataclasses.replace(
            cfg, optim=dataclasses.replace(cfg.optim, lr=args.finetune_lr))
        record("sim_real", fit(tune_cfg, network, real_batches, test_batches, runs_dir / "sim_real", real_epochs, meta),
               started, started_from=str(runs_dir / "sim" / "checkpoint.pt"))
    if "real" in args.runs:
        started = time.perf_counter()
        torch.manual_seed(cfg.seed)
        network = new_network(cfg, real_train.frames[:64], n_classes)
        record("real", fit(cfg, network, real_batches, test_batches, runs_dir / "real", real_epochs, meta), started)
    result["total_s"] = time.perf_counter() - t0
    (Path(args.out) / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
