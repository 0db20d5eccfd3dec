"""Small demonstrations of the paper.

``run_regression`` is Sec. 3.1 and Fig. 1 of Kaiser, Mostafa & Neftci (2020): three dense
layers of 512 DECOLLE neurons, driven by one fixed 500 ms Poisson spike train, each trained
through its own fixed random readout towards its own target (a ramp, a high-frequency sine, a
low-frequency sine). It is the same network (``build_network``), the same per-step detach and
one optimiser step per time step (``DecolleRule.train_sequence``): only the local loss
changes, from a class label to a real-valued target per layer and per step.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .config import LayerConfig, NetworkConfig, NeuronConfig
from .model.init import lsuv_init
from .model.network import DecolleNetwork, build_network
from .rules.decolle import DecolleRule


def poisson_input(n_inputs: int, steps: int, rate_hz: float, seed: int, dt_s: float = 1e-3) -> Tensor:
    """A fixed Poisson spike train (steps, n_inputs) of 0/1 at ``rate_hz`` per input."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(steps, n_inputs, generator=gen) < rate_hz * dt_s).float()


def regression_targets(steps: int, high_hz: float = 10.0, low_hz: float = 2.0, dt_s: float = 1e-3) -> Tensor:
    """The three pseudo-targets (steps, 3): a ramp 0 -> 1, a high- and a low-frequency sine."""
    t = torch.arange(steps, dtype=torch.float32) * dt_s
    duration = steps * dt_s
    ramp = t / duration
    fast = 0.5 * torch.sin(2 * math.pi * high_hz * t)
    slow = 0.5 * torch.sin(2 * math.pi * low_hz * t)
    return torch.stack([ramp, fast, slow], 1)


def regression_cost(y: Tensor, targets: Tensor, layer: int) -> Tensor:
    """The local cost of layer ``layer``: 0.5 sum_k (Y_k - Yhat_k)^2 averaged over the batch
    against its own target ``targets[:, layer]`` (targets (B, L, K) at one step); its gradient
    is Eq. 8's error."""
    return 0.5 * (y - targets[:, layer]).pow(2).sum(1).mean()


def regression_rule(network: DecolleNetwork, optimizer: torch.optim.Optimizer, reg1: float = 0.0,
                    reg2: float = 0.0, burn_in: int = 0) -> DecolleRule:
    """DECOLLE with a real-valued target per layer and per time step: ``train_sequence(x,
    targets)`` takes ``targets`` (B, T, L, K), and layer l's readout at step t is pulled towards
    ``targets[:, t, l]``. The rule's own loop runs unchanged (burn-in, detach, one optimiser
    step per step); only the local cost is the demo's."""
    return DecolleRule(network, optimizer, regression_cost, reg1, reg2, burn_in, target_per_step=True)


@torch.no_grad()
def readouts_over_time(network: DecolleNetwork, x: Tensor) -> Tensor:
    """Readouts (T, L, K) of every layer over ``x`` (T, ...) for batch 1, without learning."""
    was = network.training
    network.eval()
    state, ys = None, []
    for t in range(x.shape[0]):
        out, state = network(x[t:t + 1], state)
        ys.append(torch.stack([y[0] for y in out.readouts]))
    network.train(was)
    return torch.stack(ys)


def regression_mse(network: DecolleNetwork, x: Tensor, targets: Tensor, burn_in: int) -> list[float]:
    """Per-layer mean squared error of the readouts against their targets after the burn-in."""
    y = readouts_over_time(network, x)
    err = (y[burn_in:] - targets[burn_in:]).pow(2).mean((0, 2))
    return err.tolist()


@torch.no_grad()
def center_neurons(
    network: DecolleNetwork, x: Tensor, skip_steps: int = 0, target_mean: float = 0.0,
    target_std: float = 1.0, iters: int = 4,
) -> list[tuple[float, float]]:
    """Per-neuron data-driven init: every neuron's U fluctuates around the threshold over ``x``.

    Layer-wise LSUV fixes the mean and variance of U over a whole layer; with one fixed input
    most of that variance is *between* neurons (each one's U nearly constant in time), so half
    of them never spike and half spike all the time, with nothing in between to learn from.
    Here, layer by layer, each neuron's weights are rescaled until its U has ``target_std``
    over time, and its bias shifted until its U has mean 0 over time. Returns per layer the
    fraction of neurons that never spike and the mean firing rate afterwards.
    """
    was = network.training
    network.eval()
    inputs = x  # (T, B, ...) input of the current layer
    stats = []
    for layer in network.layers:
        syn = layer.synapse
        for it in range(iters + 1):
            state, us, ss = None, [], []
            for t in range(inputs.shape[0]):
                out, state = layer(inputs[t], state)
                us.append(out.u)
                ss.append(out.s)
            u = torch.stack(us)[skip_steps:].flatten(2)  # (T, B, N)
            if it == iters:
                break
            mean, std = u.mean((0, 1)), u.std(0).mean(0)
            scale = (target_std / std.clamp_min(1e-3)).clamp(0.1, 10.0)
            syn.weight.mul_(scale.view(-1, *([1] * (syn.weight.dim() - 1))))
            syn.bias.mul_(scale).sub_((mean - target_mean) * scale)
        spikes = torch.stack(ss)
        rate = spikes[skip_steps:].flatten(2).mean((0, 1))
        stats.append(((rate == 0).float().mean().item(), rate.mean().item()))
        inputs = spikes
    network.train(was)
    return stats


@torch.no_grad()
def input_activity(network: DecolleNetwork, x: Tensor, skip_steps: int = 0) -> list[float]:
    """Per layer, the mean over time of sum_j P_j: the summed trace of its inputs."""
    state, sums = None, torch.zeros(len(network.layers))
    for t in range(x.shape[0]):
        _, state = network(x[t:t + 1], state)
        if t >= skip_steps:
            sums += torch.stack([s.p.sum() for s in state])
    return (sums / max(x.shape[0] - skip_steps, 1)).clamp_min(1e-3).tolist()


@dataclass
class RegressionResult:
    mse: list[float]  # per layer, after training (a pass without updates)
    initial_mse: list[float]  # per layer, before training
    target_variance: list[float]  # per layer: the MSE of predicting the target's mean
    train_mse: list[list[float]] = field(default_factory=list)  # per epoch, per layer
    seconds: float = 0.0
    figure: str | None = None


def build_regression_network(
    n_inputs: int = 100, hidden: int = 512, layers: int = 3, readout_scale: float = 0.5,
    seed: int = 0, surrogate: str = "boxcar",
) -> DecolleNetwork:
    cfg = NetworkConfig(
        layers=[LayerConfig("dense", hidden, 1, 1) for _ in range(layers)],
        neuron=NeuronConfig(alpha=0.97, beta=0.92, gamma=0.65, rho=1.0, ordering="current"),
        surrogate=surrogate, readout_scale=readout_scale, feedback_alignment=False, dropout=0.0,
        init="lsuv",
    )
    return build_network(cfg, (n_inputs,), 1, seed)


def run_regression(
    out_dir: str | Path | None = None,
    *,
    hidden: int = 512,
    n_inputs: int = 100,
    duration_ms: int = 500,
    rate_hz: float = 50.0,
    epochs: int = 20,
    lr: float = 2e-2,
    burn_in: int = 30,
    init_mean: float = -1.0,
    readout_scale: float = 0.5,
    surrogate: str = "boxcar",
    reg1: float = 0.0,
    reg2: float = 0.0,
    seed: int = 0,
    log: Callable[[str], None] = print,
    plot: bool = True,
) -> RegressionResult:
    """Sec. 3.1: train three layers towards a ramp, a fast and a slow sine; report the MSEs.

    The network: ``build_network`` with three dense layers, LSUV, then ``center_neurons`` so that
    every neuron's U fluctuates around the threshold (mean ``init_mean``, std 1) over the input.
    One epoch is one presentation of the same spike train, with one Adamax step (betas (0,
    0.95)) per time step after ``burn_in``. Adamax moves each weight by about its lr per step,
    so U moves by about lr * sum_j P_j: each layer's lr is ``lr / sum_j P_j`` (mean over time
    of its inputs' traces) so that all layers take steps of the same size in U.

    Writes ``regression.png`` (Fig. 1: readouts vs targets and U/S/P/R of a few neurons) and
    ``regression.json`` into ``out_dir`` when given.
    """
    if hidden < 1 or n_inputs < 1 or epochs < 0 or not 0 <= burn_in < duration_ms:
        raise ValueError(f"regression demo: need hidden, n_inputs >= 1, epochs >= 0 and 0 <= burn_in "
                         f"< duration_ms, got {hidden}, {n_inputs}, {epochs}, {burn_in}, {duration_ms}")
    out = None
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)  # an unwritable place fails here, before training
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    x = poisson_input(n_inputs, duration_ms, rate_hz, seed)
    targets = regression_targets(duration_ms)[:, :, None]  # (T, L=3, K=1)
    network = build_regression_network(n_inputs, hidden, 3, readout_scale, seed, surrogate)
    lsuv_init(network, x[None], target_mean=0.0, skip_steps=burn_in)
    init_stats = center_neurons(network, x[:, None], burn_in, target_mean=init_mean)
    log("init: per-neuron centring, (silent fraction, mean rate) per layer: "
        + ", ".join(f"({a:.2f}, {b:.2f})" for a, b in init_stats))
    # Adamax moves every weight by about lr per step, so U moves by about lr * sum_j P_j: the
    # layers are given the same step in U, whatever their input activity.
    activity = input_activity(network, x, burn_in)
    groups = [{"params": list(layer.parameters()), "lr": lr / a} for layer, a in zip(network.layers, activity)]
    optimizer = torch.optim.Adamax(groups, lr=lr, betas=(0.0, 0.95))
    rule = regression_rule(network, optimizer, reg1, reg2, burn_in)

    network.eval()  # no dropout here; eval mode only skips nn.Dropout's call (faster steps)
    initial = regression_mse(network, x, targets, burn_in)
    variance = targets[burn_in:].var(0, unbiased=False).mean(1).tolist()
    log(f"regression: {hidden} x 3 dense DECOLLE neurons, {n_inputs} Poisson inputs at "
        f"{rate_hz:g} Hz, {duration_ms} ms; initial MSE "
        + " ".join(f"L{i + 1} {e:.4f}" for i, e in enumerate(initial)))
    history = []
    for epoch in range(1, epochs + 1):
        res = rule.train_sequence(x[None], targets[None])
        history.append((2.0 * res.loss).tolist())  # loss is 0.5 * squared error (K = 1)
        if epoch % max(1, epochs // 5) == 0 or epoch == epochs:
            log(f"  epoch {epoch}: training MSE " + " ".join(f"L{i + 1} {e:.4f}" for i, e in enumerate(history[-1])))
    final = regression_mse(network, x, targets, burn_in)
    result = RegressionResult(final, initial, variance, history, time.perf_counter() - t0)
    log("final MSE (no updates): " + " ".join(f"L{i + 1} {e:.4f}" for i, e in enumerate(final))
        + " | target variance " + " ".join(f"{v:.3f}" for v in variance)
        + f" | {result.seconds:.1f} s")
    if out is not None:
        if plot:
            try:
                result.figure = str(plot_regression(network, x, targets, result, out / "regression.png", burn_in))
                log(f"figure: {result.figure}")
            except ImportError:
                log("figure: skipped, matplotlib is not installed")
        (out / "regression.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


def plot_regression(
    network: DecolleNetwork, x: Tensor, targets: Tensor, result: RegressionResult, path: str | Path,
    burn_in: int = 0,
) -> Path:
    """Fig. 1 (right): each layer's readout against its target, and the top layer's neurons."""
    import numpy as np

    from .report.plots import new_figure, save_figure, draw_state_axes, record_states

    recs = record_states(network, x)
    y = readouts_over_time(network, x).numpy()
    tg = targets.numpy()
    steps = x.shape[0]
    t = np.arange(steps)
    fig = new_figure(13, 9.5)
    left, right = fig.subfigures(1, 2, width_ratios=[1, 1.15])
    names = ("ramp", "high-frequency sine", "low-frequency sine")
    axes = left.subplots(4, 1, sharex=True)
    for i in range(3):
        ax = axes[i]
        ax.plot(t, tg[:, i, 0], "k--", lw=1.3, label=f"target Ŷ{i + 1} ({names[i]})")
        ax.plot(t, y[:, i, 0], color=f"C{i}", lw=1.2, label=f"readout Y{i + 1} of layer {i + 1}")
        ax.axvspan(0, burn_in, color="0.92", zorder=0)
        ax.set_ylabel(f"layer {i + 1}")
        ax.set_title(f"layer {i + 1}: MSE {result.mse[i]:.4f} (before training {result.initial_mse[i]:.3f})", fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.25)
    ax = axes[3]
    raster = np.nonzero(x[:, : min(40, x.shape[1])].numpy().T)
    ax.plot(raster[1], raster[0], "|", color="0.2", ms=3)
    ax.set(ylabel="input", xlabel="time (ms)", title=f"input: {min(40, x.shape[1])} of {x.shape[1]} Poisson spike trains")
    ax.set_xlim(0, steps - 1)
    hist = np.array(result.train_mse)
    axes_r = right.subplots(5, 1, sharex=False, height_ratios=[1, 1, 1, 0.7, 1.1])
    draw_state_axes(axes_r[:4], recs[-1])
    axes_r[0].set_title(f"top layer (3): a few neurons over the same {steps} ms, no updates", fontsize=10)
    for a in axes_r[:4]:
        a.axvspan(0, burn_in, color="0.92", zorder=0)
    ax = axes_r[4]
    if len(hist):
        for i in range(hist.shape[1]):
            ax.plot(np.arange(1, len(hist) + 1), hist[:, i], color=f"C{i}", label=f"layer {i + 1}")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set(xlabel="presentation (epoch)", ylabel="training MSE", title="learning")
    ax.grid(alpha=0.25)
    fig.suptitle(f"DECOLLE regression (Sec. 3.1, Fig. 1): {result.seconds:.0f} s of training")
    return save_figure(fig, path)
