"""The trainer: epochs of online learning, per-layer evaluation, a run directory of results."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from .config import Config, config_from_dict, dump_config
from .data.embedded import MotionDataset, MotionSpec
from .data.pixel_model import PixelModel
from .network import DecolleNetwork, build_network, lsuv_init
from .rules.decolle import DecolleRule, SequenceResult, predict_sequence

CHECKPOINT_FORMAT = "threefactor-checkpoint"
CHECKPOINT_VERSION = 1


class RunError(RuntimeError):
    """A problem with the run's inputs or outputs, reported as one sentence."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RunError(f"device {name!r} was asked for, but this PyTorch sees no CUDA device")
    try:
        return torch.device(name)
    except RuntimeError:
        raise RunError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None


@dataclass
class FrameData:
    """A split held as one uint8 tensor of count frames (N, T, P, H, W): compact and fast to batch."""

    frames: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.frames.shape[2:])


def _stack(dataset, classes) -> FrameData:
    frames = torch.stack([torch.as_tensor(dataset[i][0]) for i in range(len(dataset))])
    labels = torch.as_tensor([int(t) for t in dataset.targets])
    return FrameData(frames.clamp_(max=255).to(torch.uint8), labels, tuple(classes))


def load_data(cfg: Config) -> tuple[FrameData, FrameData]:
    d = cfg.data
    spec = MotionSpec(
        timesteps=d.timesteps, speed=d.speed, contrast=d.contrast,
        dots_per_view=d.dots_per_view,
        pixel=PixelModel(threshold=d.threshold, noise_rate_hz=d.noise_rate_hz),
    )
    train = MotionDataset("train", d.n_train, d.seed, spec)
    test = MotionDataset("test", d.n_test, d.seed, spec)
    return _stack(train, train.classes), _stack(test, test.classes)


def make_optimizer(cfg: Config, network: DecolleNetwork) -> torch.optim.Optimizer:
    o = cfg.optim
    scales = o.layer_lr_scale or [1.0] * len(network.layers)
    groups = [
        {"params": list(layer.parameters()), "lr": o.lr * s}
        for layer, s in zip(network.layers, scales)
    ]
    if o.name == "adamax":
        return torch.optim.Adamax(groups, lr=o.lr, betas=o.betas, foreach=True)
    if o.name == "adam":
        return torch.optim.Adam(groups, lr=o.lr, betas=o.betas, foreach=True)
    return torch.optim.SGD(groups, lr=o.lr, foreach=True)


def accuracy(votes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-layer accuracy (L,) of the majority class over time from votes (L, B, C)."""
    return (votes.argmax(2) == labels[None]).float().mean(1)


def _batches(n: int, size: int, gen: torch.Generator | None):
    order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    return [order[i:i + size] for i in range(0, n, size)]


def evaluate(
    network: DecolleNetwork, data: FrameData, cfg: Config, device: torch.device
) -> tuple[list[float], list[float]]:
    """Per-layer test accuracy and mean local loss over ``data``."""
    network.eval()
    correct = torch.zeros(len(network.layers))
    loss = torch.zeros(len(network.layers))
    for idx in _batches(len(data.labels), cfg.train.eval_batch_size, None):
        x = data.frames[idx].to(device, torch.float32)
        y = data.labels[idx].to(device)
        res = predict_sequence(network, x, y, cfg.rule.burn_in, cfg.rule.loss)
        correct += (res.votes.argmax(2) == y[None]).sum(1).cpu()
        loss += res.loss.cpu() * len(idx)
    n = len(data.labels)
    return (correct / n).tolist(), (loss / n).tolist()


def save_checkpoint(
    path: Path, network: DecolleNetwork, optimizer, cfg: Config, epoch: int, data: FrameData
) -> None:
    """Written to a temporary file and renamed, so a crash never leaves a torn checkpoint."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": dump_config(cfg),
        "input_shape": list(data.input_shape),
        "classes": list(data.classes),
        "epoch": epoch,
        "model": network.state_dict(),
        "optimizer": optimizer.state_dict(),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[DecolleNetwork, Config, dict]:
    """Network, config and raw payload of a checkpoint; never unpickles arbitrary objects."""
    import yaml

    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.exists():
        raise RunError(f"{path}: no checkpoint there")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for corrupt or unsafe files
        raise RunError(f"{path}: not a readable threefactor checkpoint ({type(err).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise RunError(f"{path}: not a threefactor checkpoint")
    cfg = config_from_dict(yaml.safe_load(payload["config"]), source=f"{path} (config)")
    network = build_network(cfg.network, tuple(payload["input_shape"]), len(payload["classes"]), cfg.seed)
    try:
        network.load_state_dict(payload["model"])
    except RuntimeError:
        raise RunError(f"{path}: weights do not match the network its config describes") from None
    return network, cfg, payload


def train(
    cfg: Config,
    out_dir: str | Path,
    log: Callable[[str], None] = print,
) -> dict:
    """Train ``cfg`` and write the run directory ``out_dir``; returns the summary."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_config(cfg))
        metrics_file = open(out / "metrics.jsonl", "a")
    except OSError as err:
        raise RunError(f"cannot write the run directory {out}: {err.strerror}") from None

    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    t_start = time.perf_counter()
    train_data, test_data = load_data(cfg)
    log(
        f"data: {len(train_data.labels)} train / {len(test_data.labels)} test samples of shape "
        f"{tuple(train_data.frames.shape[1:])}, {len(train_data.classes)} classes "
        f"({time.perf_counter() - t_start:.1f} s); device: {device}"
    )

    try:
        network = build_network(cfg.network, train_data.input_shape, len(train_data.classes), cfg.seed)
    except ValueError as err:
        raise RunError(f"cannot build the network: {err}") from None
    network.to(device)
    if cfg.network.init == "lsuv":
        sample = train_data.frames[: min(64, len(train_data.labels))].to(device, torch.float32)
        stats = lsuv_init(network, sample, cfg.network.init_target_mean, skip_steps=cfg.rule.burn_in)
        log("init: LSUV, membrane (mean, var) per layer: "
            + ", ".join(f"({m:.2f}, {v:.2f})" for m, v in stats))

    optimizer = make_optimizer(cfg, network)
    step_size = cfg.optim.lr_decay_every or max(cfg.train.epochs, 1) + 1
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size, 1.0 / cfg.optim.lr_decay_factor)
    rule = DecolleRule(network, optimizer, cfg.rule.loss, cfg.rule.reg1, cfg.rule.reg2, cfg.rule.burn_in)
    gen = torch.Generator().manual_seed(cfg.seed)
    n_layers = len(network.layers)

    def record(epoch: int, split: str, accs: list[float], losses: list[float]) -> None:
        for i, (a, l) in enumerate(zip(accs, losses)):
            row = {"epoch": epoch, "split": split, "layer": i + 1, "accuracy": a, "loss": l,
                   "lr": optimizer.param_groups[0]["lr"], "time_s": time.perf_counter() - t_start}
            metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()

    test_acc, test_loss = [0.0] * n_layers, [0.0] * n_layers
    for epoch in range(1, cfg.train.epochs + 1):
        network.train()
        correct = torch.zeros(n_layers)
        loss_sum = torch.zeros(n_layers)
        seen = 0
        batches = _batches(len(train_data.labels), cfg.train.batch_size, gen)
        bar = tqdm(batches, desc=f"epoch {epoch}/{cfg.train.epochs}", unit="batch",
                   disable=not cfg.train.progress, leave=False, dynamic_ncols=True)
        for idx in bar:
            x = train_data.frames[idx].to(device, torch.float32, non_blocking=True)
            y = train_data.labels[idx].to(device)
            res: SequenceResult = rule.train_sequence(x, y)
            correct += (res.votes.argmax(2) == y[None]).sum(1).cpu()
            loss_sum += res.loss.cpu() * len(idx)
            seen += len(idx)
            bar.set_postfix(acc=f"{(correct[-1] / seen).item():.3f}", loss=f"{res.loss[-1].item():.4f}")
            if not torch.isfinite(res.loss).all():
                raise RunError(f"epoch {epoch}: the loss became {res.loss.tolist()}; lower optim.lr")
        bar.close()
        scheduler.step()
        train_acc, train_loss = (correct / seen).tolist(), (loss_sum / seen).tolist()
        record(epoch, "train", train_acc, train_loss)
        test_acc, test_loss = evaluate(network, test_data, cfg, device)
        record(epoch, "test", test_acc, test_loss)
        save_checkpoint(out / "checkpoint.pt", network, optimizer, cfg, epoch, train_data)
        log(
            f"epoch {epoch}: train acc " + " ".join(f"L{i + 1} {a:.3f}" for i, a in enumerate(train_acc))
            + " | test acc " + " ".join(f"L{i + 1} {a:.3f}" for i, a in enumerate(test_acc))
            + f" | {time.perf_counter() - t_start:.0f} s"
        )
    if cfg.train.epochs == 0:
        test_acc, test_loss = evaluate(network, test_data, cfg, device)
        record(0, "test", test_acc, test_loss)
        save_checkpoint(out / "checkpoint.pt", network, optimizer, cfg, 0, train_data)
    metrics_file.close()

    summary = {
        "test_accuracy": {f"layer{i + 1}": a for i, a in enumerate(test_acc)},
        "test_loss": {f"layer{i + 1}": l for i, l in enumerate(test_loss)},
        "last_layer_test_accuracy": test_acc[-1],
        "epochs": cfg.train.epochs,
        "wall_time_s": time.perf_counter() - t_start,
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
