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

from .config import LayerConfig, NetworkConfig
from .network import DecolleNetwork, build_network, lsuv_init
from .rules.decolle import DecolleRule, regulariser


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


def regression_loss(y: Tensor, target: Tensor) -> Tensor:
    """0.5 sum_k (Y_k - Yhat_k)^2 averaged over the batch: its gradient is Eq. 8's error."""
    return 0.5 * (y - target).pow(2).sum(1).mean()


class RegressionRule(DecolleRule):
    """DECOLLE with a real-valued target per layer and per time step.

    ``train_sequence(x, targets)`` takes ``targets`` (B, T, L, K): layer l's readout at step t
    is pulled towards ``targets[:, t, l]``. The rule's own loop runs unchanged (burn-in,
    detach, one optimiser step per step); it calls ``layer_losses`` once per step after the
    burn-in, in order, which is how this class knows the step.
    """

    def train_sequence(self, x: Tensor, targets: Tensor):
        self._t = self.burn_in
        return super().train_sequence(x, targets)

    def layer_losses(self, out, targets: Tensor) -> Tensor:
        t = self._t
        self._t += 1
        return torch.stack([
            regression_loss(y, targets[:, t, i]) + regulariser(u, self.reg1, self.reg2)
            for i, (y, u) in enumerate(zip(out.readouts, out.membranes))
        ])


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


@dataclass
class RegressionResult:
    mse: list[float]  # per layer, after training (a pass without updates)
    initial_mse: list[float]  # per layer, before training
    target_variance: list[float]  # per layer: the MSE of predicting the target's mean
    train_mse: list[list[float]] = field(default_factory=list)  # per epoch, per layer
    seconds: float = 0.0
    figure: str | None = None


def build_regression_network(
    n_inputs: int = 100, hidden: int = 512, layers: int = 3, readout_scale: float = 2.0,
    seed: int = 0,
) -> DecolleNetwork:
    cfg = NetworkConfig(
        layers=[LayerConfig("dense", hidden, 1, 1) for _ in range(layers)],
        surrogate="boxcar", readout_scale=readout_scale, init="lsuv",
    )
    return build_network(cfg, (n_inputs,), 1, seed)


def run_regression(
    out_dir: str | Path | None = None,
    *,
    hidden: int = 512,
    n_inputs: int = 100,
    duration_ms: int = 500,
    rate_hz: float = 50.0,
    epochs: int | None = None,
    lr: float = 2e-3,
    burn_in: int = 10,
    readout_scale: float = 2.0,
    reg1: float = 0.0,
    reg2: float = 0.0,
    seed: int = 0,
    log: Callable[[str], None] = print,
    plot: bool = True,
) -> RegressionResult:
    """Sec. 3.1: train three layers towards a ramp, a fast and a slow sine; report the MSEs.

    Writes ``regression.png`` (Fig. 1: readouts vs targets and U/S/P/R of a few neurons) and
    ``regression.json`` into ``out_dir`` when given.
    """
    epochs = 60 if epochs is None else epochs
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    x = poisson_input(n_inputs, duration_ms, rate_hz, seed)
    targets = regression_targets(duration_ms)[:, :, None]  # (T, L=3, K=1)
    network = build_regression_network(n_inputs, hidden, 3, readout_scale, seed)
    lsuv_init(network, x[None], target_mean=0.0, skip_steps=burn_in)
    optimizer = torch.optim.Adamax(network.parameters(), lr=lr, betas=(0.0, 0.95))
    rule = RegressionRule(network, optimizer, "mse", reg1, reg2, burn_in)

    initial = regression_mse(network, x, targets, burn_in)
    variance = targets[burn_in:].var(0, unbiased=False).mean(1).tolist()
    log(f"regression: {hidden} x 3 dense DECOLLE neurons, {n_inputs} Poisson inputs at "
        f"{rate_hz:g} Hz, {duration_ms} ms; initial MSE "
        + " ".join(f"L{i + 1} {e:.4f}" for i, e in enumerate(initial)))
    history = []
    for epoch in range(1, epochs + 1):
        res = rule.train_sequence(x[None], targets[None])
        history.append((2.0 * res.loss).tolist())  # loss is 0.5 * squared error (K = 1)
        if epoch % max(1, epochs // 6) == 0 or epoch == epochs:
            log(f"  epoch {epoch}: training MSE " + " ".join(f"L{i + 1} {e:.4f}" for i, e in enumerate(history[-1])))
    final = regression_mse(network, x, targets, burn_in)
    result = RegressionResult(final, initial, variance, history, time.perf_counter() - t0)
    log("final MSE (no updates): " + " ".join(f"L{i + 1} {e:.4f}" for i, e in enumerate(final))
        + " | target variance " + " ".join(f"{v:.3f}" for v in variance)
        + f" | {result.seconds:.1f} s")
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
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

    from .plots import _figure, _save, draw_state_axes, record_states

    recs = record_states(network, x)
    y = readouts_over_time(network, x).numpy()
    tg = targets.numpy()
    steps = x.shape[0]
    t = np.arange(steps)
    fig = _figure(13, 9.5)
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
    return _save(fig, path)
