"""What one epoch of a preset costs on this machine, measured on a few training batches.

    ./dev run python -m benchmarks.preset_cost [--config nmnist] [--batch 8] [--batches 2]
        [--threads 2] [--set key=value ...]

It builds the preset's network, optimiser and rule as ``threefactor train`` does (LSUV
initialisation included), reads ``--batch x --batches`` real recordings framed as the preset
frames them (by default from ``$THREEFACTOR_DATA/nmnist-small``, since the full N-MNIST is not
here), times one online training sequence per batch (the first one too: it holds no compile
step), and scales the median to an epoch of the preset's ``data.n_train`` samples. A smaller
``--batch`` than the preset's keeps the measurement short; the conv layers use the machine
better at larger batches, so the epoch estimate is an upper bound. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from threefactor.config import load_config
from threefactor.model.init import lsuv_init
from threefactor.model.network import build_network
from threefactor.rules import make_rule
from threefactor.run.from_config import load_split, make_optimizer


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.preset_cost")
    parser.add_argument("--config", default="nmnist")
    parser.add_argument("--data-root", default="$THREEFACTOR_DATA/nmnist-small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    preset = load_config(args.config, args.set)
    n = args.batch * args.batches
    cfg = load_config(args.config, [*args.set, f"data.root={args.data_root}", f"data.n_train={n}",
                                    "train.progress=false"])
    data = load_split(cfg, "train")
    torch.manual_seed(cfg.seed)
    network = build_network(cfg.network, tuple(data.input_shape), len(data.classes), cfg.seed)
    lsuv_init(network, data.frames[: args.batch].float(), cfg.network.init_target_mean, skip_steps=cfg.rule.burn_in)
    optimizer = make_optimizer(cfg, network)
    rule = make_rule(cfg, network, optimizer)
    network.train()
    times = []
    for b in range(args.batches):
        x = data.frames[b * args.batch:(b + 1) * args.batch].float()
        y = data.labels[b * args.batch:(b + 1) * args.batch]
        t0 = time.perf_counter()
        rule.train_sequence(x, y)
        times.append(time.perf_counter() - t0)
    per_batch = statistics.median(times)
    per_sample = per_batch / args.batch
    result = {
        "config": args.config, "overrides": args.set,
        "layers": [f"{layer.type} {layer.kernel}x{layer.kernel} {layer.channels} pool {layer.pool}" for layer in cfg.network.layers],
        "timesteps": cfg.data.timesteps, "dt_us": cfg.data.dt_us, "input_shape": list(data.input_shape),
        "batch": args.batch, "preset_batch": preset.train.batch_size, "threads": args.threads,
        "batch_s": times, "per_sample_s": per_sample,
        "preset_n_train": preset.data.n_train, "epoch_h": per_sample * preset.data.n_train / 3600,
        "parameters": sum(p.numel() for p in network.parameters()),
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
