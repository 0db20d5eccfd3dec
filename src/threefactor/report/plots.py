"""Pictures of a run, drawn with matplotlib's Agg canvas (no display, no global backend change).

``draw_run`` writes into ``RUN_DIR/plots``:

- ``error_curves.png``: per-layer test (and training) error and loss against training samples
  seen, from metrics.jsonl (the paper's Figs. 3 and 4);
- ``filters.png``: the first layer's learned filters, one grid per input polarity (Fig. 5);
- ``neuron_states.png``: for every layer, the traces P of a few inputs, the membrane U, spikes
  S and refractory trace R of a few neurons, and the readout against its target, over one
  test sample (the right half of Fig. 1);
- ``input_events.png``: that test sample's events: per-polarity counts, events per ms and
  snapshots over time.

Time axes are in ms: steps times the run's bin, ``data.dt_us``.

``PlotsObserver`` draws them when a run ends; ``threefactor.run.reopen.plot_run(RUN_DIR)``
redraws them from a finished or running run (checkpoint + metrics.jsonl), for ``threefactor
plot RUN_DIR``.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..atomic import write_atomic
from ..run.observer import Observer

PLOTS_DIR = "plots"
PLOT_FILES = ("error_curves.png", "filters.png", "neuron_states.png", "input_events.png")
_LAYER_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


def new_figure(width: float, height: float):
    """A matplotlib Figure on its own Agg canvas (no display, no global backend change)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def save_figure(fig, path: Path) -> Path:
    """PNG written to a uniquely named temporary file and renamed: a reader never sees half a
    picture, and two writers (a run ending, ``threefactor plot``) never share a temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_atomic(path, buf.getvalue())
    return path


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a metrics.jsonl; a torn last line (a run writing right now) is skipped.

    A path that is not a regular file (a link to a device, a pipe) is a ``ValueError``: it
    could be read forever."""
    rows = []
    path = Path(path)
    if not path.exists():
        return rows
    if not path.is_file():
        raise ValueError(f"{path}: not a regular file, so not a metrics file")
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


# --- Figs. 3 and 4: error against training iterations ------------------------------------


def plot_error_curves(rows: Sequence[dict], path: str | Path, title: str = "") -> Path:
    fig = new_figure(11, 4.2)
    ax_err, ax_loss = fig.subplots(1, 2)
    layers = sorted({r["layer"] for r in rows if "layer" in r})
    for layer in layers:
        colour = _LAYER_COLOURS[(layer - 1) % len(_LAYER_COLOURS)]
        for split, style in (("test", "-o"), ("train", "--")):
            pts = [r for r in rows if r.get("layer") == layer and r.get("split") == split]
            if not pts:
                continue
            x = [r.get("samples", r.get("epoch", 0)) for r in pts]
            ax_err.plot(x, [100 * (1 - r["accuracy"]) for r in pts], style, color=colour, ms=4,
                        label=f"layer {layer} {split}", alpha=1.0 if split == "test" else 0.6)
            ax_loss.plot(x, [r["loss"] for r in pts], style, color=colour, ms=4,
                         label=f"layer {layer} {split}", alpha=1.0 if split == "test" else 0.6)
    xlabel = "training samples seen" if any("samples" in r for r in rows) else "epoch"
    ax_err.set(xlabel=xlabel, ylabel="classification error (%)", title="per-layer error (cf. Figs. 3, 4)")
    ax_err.set_ylim(bottom=0)
    ax_loss.set(xlabel=xlabel, ylabel="local loss", title="per-layer local loss")
    for ax in (ax_err, ax_loss):
        ax.grid(alpha=0.3)
        if layers:
            ax.legend(fontsize=8)
    if not rows:
        ax_err.text(0.5, 0.5, "no metrics yet", ha="center", va="center", transform=ax_err.transAxes)
    test_last = {r["layer"]: r for r in rows if r.get("split") == "test"}
    summary = "  ".join(f"L{k}: {100 * (1 - r['accuracy']):.1f}%" for k, r in sorted(test_last.items()))
    fig.suptitle((title + "   " if title else "") + (f"last test error {summary}" if summary else ""))
    return save_figure(fig, path)


# --- Fig. 5: first-layer filters ------------------------------------------------------------


def _channel_names(n: int) -> list[str]:
    return ["OFF (p = 0)", "ON (p = 1)"] if n == 2 else [f"input channel {c}" for c in range(n)]


def plot_filters(network, input_shape: Sequence[int], path: str | Path, max_filters: int = 64) -> Path:
    """The first layer's weights: conv kernels (or dense receptive fields) per input channel."""
    w = network.layers[0].synapse.weight.detach().float().cpu()
    if w.dim() == 4:  # conv: (C_out, C_in, k, k)
        kind = f"{w.shape[2]} x {w.shape[3]} kernels"
    elif len(input_shape) == 3 and min(input_shape[1:]) > 1:  # dense on a (C, H, W) image
        w = w.reshape(w.shape[0], *input_shape)
        kind = "receptive fields"
    else:  # dense on a flat input
        w = w[:max_filters]
        fig = new_figure(9, 4.5)
        ax = fig.subplots()
        vmax = float(w.abs().max()) or 1.0
        im = ax.imshow(w.numpy(), aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
        ax.set(xlabel="input", ylabel="neuron", title=f"layer 1 weights (first {len(w)} neurons)")
        fig.colorbar(im, ax=ax, shrink=0.8)
        return save_figure(fig, path)
    w = w[:max_filters]
    n, channels = w.shape[0], w.shape[1]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    vmax = float(w.abs().max()) or 1.0
    # one grid per input channel, side by side, separated by a narrow empty column
    width_ratios = []
    for c in range(channels):
        width_ratios += [1.0] * cols + ([0.35] if c < channels - 1 else [])
    fig = new_figure(1.1 * len(width_ratios) + 1.2, 1.1 * rows + 0.9)
    axes = np.array(fig.subplots(rows, len(width_ratios), width_ratios=width_ratios, squeeze=False))
    im = None
    for ax in axes.ravel():
        ax.set_axis_off()
    for c, name in enumerate(_channel_names(channels)):
        first = c * (cols + 1)
        for i in range(n):
            ax = axes[i // cols, first + i % cols]
            im = ax.imshow(w[i, c].numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
        axes[0, first + (cols - 1) // 2].set_title(name, fontsize=11, loc="left" if cols % 2 == 0 else "center")
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.7, label="weight")
    fig.suptitle(f"layer 1: {n} learned {kind} per input polarity (cf. Fig. 5)")
    return save_figure(fig, path)


# --- Fig. 1: neuron states over time --------------------------------------------------------


def _layer_view(network, out, state, i: int, layer_input: Tensor):
    """(u, s, p, r) of layer ``i`` flattened over its neurons / inputs, and its threshold.

    DECOLLE: U and S after pooling, the input traces P and the refractory trace R. Soft-reset
    LIF (S-TLLR): the neurons' u and spikes before pooling, the raw input in place of P, no R.
    """
    st = state[i]
    if hasattr(st, "p"):
        return (out.membranes[i].flatten(), out.spikes[i].flatten(), st.p.flatten(), st.r.flatten(), 0.0)
    v_th = float(getattr(getattr(network.layers[i], "params", None), "v_th", 0.0))
    return out.membranes[i].flatten(), st.s.flatten(), layer_input.flatten(), None, v_th


@torch.no_grad()
def record_states(network, x: Tensor, n_neurons: int = 3, n_inputs: int = 3) -> list[dict]:
    """Run one sample ``x`` (T, ...) and record a few neurons of every layer.

    Per layer: ``inputs`` (T, n_inputs) spikes into the layer and ``p`` their traces P,
    ``u``, ``s``, ``r`` (T, n_neurons) of the chosen neurons (``r`` is None for LIF neurons,
    which have no refractory trace), ``y`` (T, C) the readout, the chosen indices and the
    ``threshold`` of U. Neurons are chosen among those that spike, but not at every other
    step; inputs are those whose trace P varies most over time (not always on or off).
    """
    was_training = network.training
    network.eval()
    x = x.float()
    device = next(network.parameters()).device
    n_layers = len(network.layers)
    counts: list = [0.0] * n_layers
    u_sum: list = [0.0] * n_layers
    p_sum: list = [0.0] * n_layers
    p_sq: list = [0.0] * n_layers
    steps = x.shape[0]
    state = None
    for t in range(steps):  # pass 1: choose the neurons and inputs to show
        xt = x[t:t + 1].to(device)
        out, state = network(xt, state)
        for i in range(n_layers):
            u, s, p, _, _ = _layer_view(network, out, state, i, xt if i == 0 else out.spikes[i - 1])
            counts[i] = counts[i] + s
            u_sum[i] = u_sum[i] + u
            p_sum[i] = p_sum[i] + p
            p_sq[i] = p_sq[i] + p * p
    chosen, chosen_in = [], []
    for i in range(n_layers):
        c = counts[i].cpu()
        score = torch.where((c > 0) & (c <= 0.5 * steps), c, torch.full_like(c, -1.0))
        order = torch.argsort(score, descending=True, stable=True)
        picks = [int(j) for j in order[:n_neurons] if score[j] > 0]
        if len(picks) < min(n_neurons, len(c)):
            for j in torch.argsort(u_sum[i].cpu(), descending=True, stable=True).tolist():
                if j not in picks:
                    picks.append(j)
                if len(picks) == min(n_neurons, len(c)):
                    break
        chosen.append(torch.tensor(picks, device=device))
        p_var = (p_sq[i] / steps - (p_sum[i] / steps) ** 2).cpu()
        chosen_in.append(torch.argsort(p_var, descending=True, stable=True)[:n_inputs].to(device))
    rec = [{k: [] for k in ("inputs", "p", "u", "s", "r", "y")} for _ in range(n_layers)]
    thresholds = [0.0] * n_layers
    state = None
    for t in range(steps):  # pass 2: record them
        xt = x[t:t + 1].to(device)
        out, state = network(xt, state)
        for i in range(n_layers):
            inp = xt if i == 0 else out.spikes[i - 1]
            u, s, p, r, thresholds[i] = _layer_view(network, out, state, i, inp)
            idx, idx_in = chosen[i], chosen_in[i]
            rec[i]["inputs"].append(inp.flatten()[idx_in].cpu())
            rec[i]["p"].append(p[idx_in].cpu())
            rec[i]["u"].append(u[idx].cpu())
            rec[i]["s"].append(s[idx].cpu())
            if r is not None:
                rec[i]["r"].append(r[idx].cpu())
            rec[i]["y"].append(out.readouts[i][0].cpu())
    network.train(was_training)
    result = []
    for i in range(n_layers):
        layer = {k: torch.stack(v).float().numpy() if v else None for k, v in rec[i].items()}
        layer["neurons"] = chosen[i].tolist()
        layer["input_units"] = chosen_in[i].tolist()
        layer["threshold"] = thresholds[i]
        layer["traces"] = layer["r"] is not None  # DECOLLE: p is the trace P; LIF: p is the input
        result.append(layer)
    return result


def draw_state_axes(axes: Sequence, rec: dict, t0: float = 0.0, show_xlabel: bool = True,
                    dt_ms: float = 1.0) -> None:
    """Four stacked axes: inputs' P (with their spikes), U, S and R of the recorded neurons,
    against time in ms (``t0`` ms at the first of the steps of ``dt_ms``)."""
    ax_p, ax_u, ax_s, ax_r = axes
    steps = rec["u"].shape[0]
    t = t0 + dt_ms * np.arange(steps)
    for k in range(rec["p"].shape[1]):
        colour = f"C{k + 5}"
        ax_p.plot(t, rec["p"][:, k], color=colour, lw=1.2, label=f"input {rec['input_units'][k]}")
        spikes = np.nonzero(rec["inputs"][:, k] > 0)[0]
        ax_p.plot(t[spikes], np.full(len(spikes), -0.08 * (k + 1) * max(rec["p"].max(), 1e-6)),
                  "|", color=colour, ms=5)
    ax_p.set_ylabel("P (inputs)" if rec.get("traces", True) else "inputs")
    for k in range(rec["u"].shape[1]):
        colour = f"C{k}"
        ax_u.plot(t, rec["u"][:, k], color=colour, lw=1.0, label=f"neuron {rec['neurons'][k]}")
        spikes = np.nonzero(rec["s"][:, k] > 0)[0]
        ax_s.plot(t[spikes], np.full(len(spikes), k), "|", color=colour, ms=9, mew=1.5)
        if rec["r"] is not None:
            ax_r.plot(t, rec["r"][:, k], color=colour, lw=1.0)
    if rec["r"] is None:
        ax_r.text(0.5, 0.5, "no refractory trace (soft-reset LIF)", ha="center", va="center",
                  transform=ax_r.transAxes, color="0.4")
    ax_u.axhline(rec.get("threshold", 0.0), color="k", lw=0.8, ls="--")
    ax_u.set_ylabel("U")
    ax_s.set_ylabel("S")
    ax_s.set_yticks(range(rec["u"].shape[1]))
    ax_s.set_ylim(-0.7, rec["u"].shape[1] - 0.3)
    ax_r.set_ylabel("R")
    ax_p.legend(fontsize=7, loc="upper left")
    ax_u.legend(fontsize=7, loc="upper left")
    for ax in axes:
        ax.set_xlim(t[0], t[-1])
        ax.grid(alpha=0.25)
    if show_xlabel:
        ax_r.set_xlabel("time (ms)")


def plot_neuron_states(
    network, x: Tensor, label: int, classes: Sequence[str], path: str | Path, burn_in: int = 0,
    dt_ms: float = 1.0,
) -> Path:
    """Fig. 1 for one sample ``x`` (T, ...) whose steps are ``dt_ms`` long."""
    recs = record_states(network, x)
    n_layers = len(recs)
    fig = new_figure(4.3 * n_layers + 0.5, 11)
    axes = np.array(fig.subplots(5, n_layers, sharex=True, squeeze=False))
    for i, rec in enumerate(recs):
        col = axes[:, i]
        draw_state_axes(col[:4], rec, show_xlabel=False, dt_ms=dt_ms)
        col[0].set_title(f"layer {i + 1}")
        ax = col[4]
        y = rec["y"]
        t = dt_ms * np.arange(len(y))
        for c in range(y.shape[1]):
            if c != label:
                ax.plot(t, y[:, c], color="0.7", lw=0.8)
        ax.plot(t, y[:, label], color="tab:red", lw=1.4, label=f"Y[{classes[label]}]")
        ax.plot(t, np.ones_like(t, dtype=float), "k--", lw=1.0, label="target 1")
        ax.plot(t, np.zeros_like(t, dtype=float), ":", color="0.4", lw=1.0, label="target 0 (others, grey)")
        if burn_in:
            for a in col:
                a.axvspan(0, burn_in * dt_ms, color="0.92", zorder=0)
        ax.set(ylabel="readout Y", xlabel="time (ms)")
        ax.grid(alpha=0.25)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"states of a few neurons over one test sample (class {classes[label]!r}; "
                 "grey band: burn-in), cf. Fig. 1")
    return save_figure(fig, path)


# --- the input ------------------------------------------------------------------------------


def plot_input_events(frames: Tensor, label: int, classes: Sequence[str], path: str | Path,
                      n_snapshots: int = 6, dt_ms: float = 1.0) -> Path:
    """One sample's count frames (T, P, H, W) of bins of ``dt_ms``: per-polarity sums, rate
    over time, snapshots.

    Inputs that are not images (e.g. SHD's 700 channels) are drawn as a raster instead.
    """
    f = frames.float().cpu().numpy()
    if f.ndim != 4 or min(f.shape[2:]) == 1:
        return _plot_input_raster(f.reshape(f.shape[0], -1), label, classes, path, dt_ms)
    steps, channels = f.shape[0], f.shape[1]
    names = _channel_names(channels)
    fig = new_figure(3.0 * max(n_snapshots, channels + 2) * 0.75, 6.8)
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.1, 1])
    axes = top.subplots(1, channels + 1, width_ratios=[1] * channels + [1.8])
    cmaps = ["Blues", "Reds"] if channels == 2 else ["viridis"] * channels
    for c in range(channels):
        im = axes[c].imshow(f[:, c].sum(0), cmap=cmaps[c], interpolation="nearest")
        axes[c].set_title(f"{names[c]}: {int(f[:, c].sum())} events", fontsize=9)
        axes[c].set_axis_off()
        top.colorbar(im, ax=axes[c], shrink=0.75)
    ax = axes[-1]
    t = dt_ms * np.arange(steps)
    colours = ["tab:blue", "tab:red"] if channels == 2 else [f"C{c}" for c in range(channels)]
    for c in range(channels):
        ax.plot(t, f[:, c].sum((1, 2)) / dt_ms, color=colours[c], label=names[c])
    ax.set(xlabel="time (ms)", ylabel="events per ms", title="events over time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    snaps = bottom.subplots(1, n_snapshots)
    edges = np.linspace(0, steps, n_snapshots + 1).astype(int)
    for k, ax in enumerate(np.atleast_1d(snaps)):
        a, b = edges[k], max(edges[k + 1], edges[k] + 1)
        window = f[a:b].sum(0)
        if channels == 2:  # on white: ON red, OFF blue, both purple-black
            scale = max(window.max(), 1.0)
            on, off = window[1, ..., None] / scale, window[0, ..., None] / scale
            rgb = 1.0 - on * np.array([0.0, 1.0, 1.0]) - off * np.array([1.0, 1.0, 0.0])
            ax.imshow(np.clip(rgb, 0.0, 1.0), interpolation="nearest")
        else:
            ax.imshow(window.sum(0), cmap="gray_r", interpolation="nearest")
        ax.set_title(f"{a * dt_ms:g}-{b * dt_ms:g} ms", fontsize=9)
        ax.set_axis_off()
    bottom.suptitle("snapshots (red: ON, blue: OFF)" if channels == 2 else "snapshots", fontsize=10)
    fig.suptitle(f"an input sample: class {classes[label]!r}, {steps} steps of {dt_ms:g} ms")
    return save_figure(fig, path)


def _plot_input_raster(f: np.ndarray, label: int, classes: Sequence[str], path: str | Path,
                       dt_ms: float = 1.0) -> Path:
    """(T, N) counts of a non-image input: channels over time, and events per ms."""
    fig = new_figure(11, 6)
    ax_r, ax_n = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    t, ch = np.nonzero(f > 0)
    t = dt_ms * t
    ax_r.plot(t, ch, ",", color="k") if len(t) > 5000 else ax_r.plot(t, ch, "|", color="k", ms=3)
    ax_r.set(ylabel="input channel", ylim=(-0.5, f.shape[1] - 0.5))
    ax_n.plot(dt_ms * np.arange(f.shape[0]), f.sum(1) / dt_ms, color="tab:blue")
    ax_n.set(xlabel="time (ms)", ylabel="events per ms")
    for ax in (ax_r, ax_n):
        ax.grid(alpha=0.3)
    fig.suptitle(f"an input sample: class {classes[label]!r}, {int(f.sum())} events in "
                 f"{f.shape[0]} steps of {dt_ms:g} ms")
    return save_figure(fig, path)


# --- a whole run ----------------------------------------------------------------------------


def draw_run(
    run_dir: str | Path,
    network,
    frames: Tensor,
    label: int,
    classes: Sequence[str],
    rows: Sequence[dict] | None = None,
    burn_in: int = 0,
    dt_ms: float = 1.0,
) -> list[Path]:
    """All the plots of a run into ``run_dir/plots``; returns their paths. ``frames`` (T, ...)
    and ``label``: the sample whose states and events are drawn. Time axes are in ms, steps of
    ``dt_ms`` (the run's bin, ``data.dt_us``)."""
    run_dir = Path(run_dir)
    out = run_dir / PLOTS_DIR
    if rows is None:
        rows = read_metrics(run_dir / "metrics.jsonl")
    paths = [
        plot_error_curves(rows, out / "error_curves.png", title=run_dir.name),
        plot_filters(network, tuple(frames.shape[1:]), out / "filters.png"),
        plot_neuron_states(network, frames, label, classes, out / "neuron_states.png", burn_in, dt_ms),
        plot_input_events(frames, label, classes, out / "input_events.png", dt_ms=dt_ms),
    ]
    return paths


def plot_confusion(confusion: np.ndarray, accuracy: Sequence[float], classes: Sequence[str], path: str | Path) -> Path:
    """One panel per layer of ``confusion`` (L, C, C counts, row = true class, column = the
    class the layer voted): the fractions of each true class."""
    n_layers, n_classes = confusion.shape[:2]
    fig = new_figure(3.6 * n_layers, 3.4)
    axes = fig.subplots(1, n_layers, squeeze=False)[0]
    per_class = confusion.sum(2, keepdims=True).clip(min=1)
    for layer, ax in enumerate(axes):
        ax.imshow(confusion[layer] / per_class[layer], vmin=0, vmax=1, cmap="Blues")
        ax.set_title(f"layer {layer + 1}: {100 * accuracy[layer]:.1f} %")
        ticks = range(n_classes)
        labels = [str(c)[:8] for c in classes] if n_classes <= 20 else None
        if labels:
            ax.set_xticks(ticks, labels, rotation=90, fontsize=7)
            ax.set_yticks(ticks, labels, fontsize=7)
        ax.set_xlabel("voted class")
        ax.set_ylabel("true class")
    return save_figure(fig, path)


class PlotsObserver(Observer):
    """Draws ``draw_run``'s plots when the run ends, of the sample ``frames`` (T, ...) with
    ``label``. A drawing problem is logged and never costs a finished run its results."""

    def __init__(self, frames: Tensor, label: int, classes: Sequence[str], *, burn_in: int = 0,
                 dt_ms: float = 1.0) -> None:
        self.frames, self.label, self.classes = frames, label, list(classes)
        self.burn_in, self.dt_ms = burn_in, dt_ms
        self.run_dir: Path | None = None
        self.log = print

    def on_start(self, run) -> None:
        self.run_dir, self.log = run.out_dir, run.log

    def on_end(self, summary: dict, network) -> None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            self.log("plots: skipped, matplotlib is not installed (pip install matplotlib)")
            return
        try:
            paths = draw_run(self.run_dir, network, self.frames, self.label, self.classes,
                             burn_in=self.burn_in, dt_ms=self.dt_ms)
        except Exception as err:  # noqa: BLE001 - the run's results are already written
            self.log(f"plots: could not draw them ({type(err).__name__}: {err}); retry with "
                     f"threefactor plot {self.run_dir}")
            return
        self.log(f"plots: {', '.join(p.name for p in paths)} in {self.run_dir / PLOTS_DIR}")
