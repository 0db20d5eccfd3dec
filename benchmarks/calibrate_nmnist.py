"""How close ``SimulatedNMNIST`` comes to the real N-MNIST recordings, statistic by statistic.

    ./dev run python -m benchmarks.calibrate_nmnist [--n 300] [--out benchmarks/results/sim2real]

The real recordings of ``$THREEFACTOR_DATA/nmnist-small/Train`` are MNIST training digits
(file ``<id>.bin`` is MNIST image ``id - 1``), so every real recording is compared with the
simulation of the very same digit. For the real recordings, the simulator as it was before the
calibration (``BEFORE``) and as it is now (``SaccadeSpec()``) it measures: events per recording,
the ON fraction, the event rate over time (the three saccades), the spatial spread, the
inter-event intervals, and how well the time-summed count image of each simulated digit
correlates with the real recording of that digit. Writes ``calibration.json`` (the table) and
``calibration.png`` (real and simulated side by side) under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from threefactor.data.datasets.mnist import load_mnist
from threefactor.data.datasets.nmnist import NMNIST
from threefactor.data.home import resolve_root
from threefactor.data.synthetic.pixel_model import PixelModel
from threefactor.data.synthetic.saccades import SaccadeSpec, simulate_saccades

# The simulator before this calibration: three back-to-back 100 ms saccades over 300 ms, a blur
# of 0.7 pixels, threshold 0.3, the same contrast for every recording, every pixel's reference
# starting exactly at the first frame.
BEFORE = SaccadeSpec(onsets_us=(0.0, 100_000.0, 200_000.0), move_us=100_000.0, duration_us=300_000.0,
                     blur_px=0.7, contrast_jitter=0.0,
                     pixel=PixelModel(threshold=0.3, threshold_mismatch=0.03, noise_rate_hz=0.2))
RATE_BIN_US = 2_000
RATE_END_US = 320_000
SENSOR = 34


def real_recordings(root: Path, n: int, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """``n`` training recordings drawn at random (seeded) and the MNIST index of each one's digit."""
    ds = NMNIST(root, "train")
    idx = np.sort(np.random.default_rng(seed).choice(len(ds), min(n, len(ds)), replace=False))
    events = [ds.events(int(i)) for i in idx]
    mnist_index = np.array([int(Path(ds.source(int(i))[0]).stem) - 1 for i in idx])
    return events, mnist_index


def simulate(images: np.ndarray, spec: SaccadeSpec, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [ev for k in range(0, len(images), 50) for ev in simulate_saccades(images[k:k + 50], spec, rng)]


def count_image(ev: np.ndarray) -> np.ndarray:
    """(2, 34, 34) events per pixel and polarity over the whole recording."""
    img = np.zeros((2, SENSOR, SENSOR))
    np.add.at(img, (ev["p"].astype(int), ev["y"].astype(int), ev["x"].astype(int)), 1)
    return img


def statistics(recordings: list[np.ndarray]) -> dict:
    n = np.array([len(e) for e in recordings], dtype=float)
    on = np.array([e["p"].mean() for e in recordings])
    bins = np.arange(0, RATE_END_US + 1, RATE_BIN_US)
    rate = np.mean([np.histogram(e["t"], bins=bins)[0] for e in recordings], axis=0) / (RATE_BIN_US / 1000)
    thirds = [np.mean([((e["t"] >= a) & (e["t"] < b)).mean() for e in recordings])
              for a, b in ((0, 100_000), (100_000, 200_000), (200_000, 10**9))]
    iei = np.concatenate([np.diff(e["t"]) for e in recordings])
    active = np.array([(count_image(e).sum(0) > 0).sum() for e in recordings], dtype=float)
    return {
        "events_mean": float(n.mean()), "events_std": float(n.std()),
        "events_p5": float(np.percentile(n, 5)), "events_p95": float(np.percentile(n, 95)),
        "on_fraction": float(on.mean()),
        "share_0_100ms": thirds[0], "share_100_200ms": thirds[1], "share_200ms_on": thirds[2],
        "last_event_ms": float(np.mean([e["t"].max() for e in recordings]) / 1000),
        "spread_x_px": float(np.mean([e["x"].std() for e in recordings])),
        "spread_y_px": float(np.mean([e["y"].std() for e in recordings])),
        "active_pixels": float(active.mean()), "events_per_active_pixel": float((n / active).mean()),
        "iei_mean_us": float(iei.mean()), "iei_median_us": float(np.median(iei)),
        "iei_p90_us": float(np.percentile(iei, 90)), "iei_zero_fraction": float((iei == 0).mean()),
        "rate_per_ms": rate.tolist(),
    }


def compare(real: dict, sim: dict, real_events: list[np.ndarray], sim_events: list[np.ndarray]) -> dict:
    """How far ``sim`` is from ``real``: the rate profiles' correlation and L1 distance (of the
    profiles normalised to sum 1), and the mean correlation of each digit's count images."""
    r, s = np.asarray(real["rate_per_ms"]), np.asarray(sim["rate_per_ms"])
    pair = [np.corrcoef(count_image(a).ravel(), count_image(b).ravel())[0, 1] for a, b in zip(real_events, sim_events)]
    return {
        "rate_profile_correlation": float(np.corrcoef(r, s)[0, 1]),
        "rate_profile_l1": float(np.abs(r / r.sum() - s / s.sum()).sum()),
        "count_image_correlation": float(np.mean(pair)),
    }


def figure(real: dict, before: dict, after: dict, real_ev, before_ev, after_ev, path: Path) -> None:
    from threefactor.report.plots import new_figure, save_figure

    fig = new_figure(13, 8.5)
    grid = fig.add_gridspec(3, 4)
    t = (np.arange(len(real["rate_per_ms"])) + 0.5) * RATE_BIN_US / 1000
    series = (("real", real, real_ev, "k"), ("simulated, before", before, before_ev, "tab:orange"),
              ("simulated, calibrated", after, after_ev, "tab:blue"))
    ax = fig.add_subplot(grid[0, :2])
    for name, st, _, c in series:
        ax.plot(t, st["rate_per_ms"], color=c, label=name)
    ax.set(xlabel="time (ms)", ylabel="events per ms (mean)", title="event rate: the three saccades")
    ax.legend(fontsize=8)
    ax = fig.add_subplot(grid[0, 2])
    for name, _, ev, c in series:
        ax.hist([len(e) for e in ev], bins=30, histtype="step", color=c, label=name, density=True)
    ax.set(xlabel="events per recording", title="events per recording")
    ax = fig.add_subplot(grid[0, 3])
    edges = np.logspace(0, 4.5, 40)
    for name, _, ev, c in series:
        iei = np.concatenate([np.diff(e["t"]) for e in ev])
        ax.hist(iei[iei > 0], bins=edges, histtype="step", color=c, density=True)
    ax.set(xscale="log", xlabel="inter-event interval (us, > 0)", title="inter-event intervals")
    ax = fig.add_subplot(grid[1, 0])
    for name, _, ev, c in series:
        bins = np.arange(0, RATE_END_US + 1, 10_000)
        on = [np.mean(np.concatenate([e["p"][(e["t"] >= a) & (e["t"] < b)] for e in ev]) if any(
            ((e["t"] >= a) & (e["t"] < b)).any() for e in ev) else [np.nan]) for a, b in zip(bins[:-1], bins[1:])]
        ax.plot(bins[:-1] / 1000 + 5, on, color=c)
    ax.set(xlabel="time (ms)", ylabel="ON fraction", ylim=(0.2, 0.9), title="ON / (ON + OFF)")
    ax = fig.add_subplot(grid[1, 1])
    for name, _, ev, c in series:
        ax.plot(np.mean([count_image(e).sum((0, 1)) for e in ev], axis=0), color=c)
    ax.set(xlabel="x (px)", ylabel="events per column", title="spatial spread (x)")
    for k, (name, _, ev, _) in enumerate(series[::2]):  # real and calibrated, same digits
        ax = fig.add_subplot(grid[1, 2 + k])
        mean = np.mean([count_image(e) for e in ev], axis=0)
        ax.imshow(mean[1] - mean[0], cmap="RdBu_r", vmin=-3, vmax=3)
        ax.set(title=f"ON - OFF per pixel: {name.split(', ')[-1]}", xticks=[], yticks=[])
    for k in range(4):  # one digit, real above simulated, as count images
        ax = fig.add_subplot(grid[2, k])
        both = np.concatenate([count_image(real_ev[k]).sum(0), count_image(after_ev[k]).sum(0)], axis=1)
        ax.imshow(both, cmap="gray_r")
        ax.set(title=f"recording {k}: real | calibrated", xticks=[], yticks=[])
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.calibrate_nmnist")
    parser.add_argument("--n", type=int, default=300, help="real recordings (and simulations of their digits)")
    parser.add_argument("--nmnist", default="$THREEFACTOR_DATA/nmnist-small")
    parser.add_argument("--mnist", default="$THREEFACTOR_DATA/mnist")
    parser.add_argument("--out", default="benchmarks/results/sim2real")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    real_ev, mnist_index = real_recordings(resolve_root(args.nmnist), args.n)
    images, _ = load_mnist(resolve_root(args.mnist), "train")
    digits = images[mnist_index]
    before_ev, after_ev = simulate(digits, BEFORE), simulate(digits, SaccadeSpec())
    real, before, after = statistics(real_ev), statistics(before_ev), statistics(after_ev)
    result = {
        "n_recordings": len(real_ev),
        "spec_before": dataclasses.asdict(BEFORE), "spec_after": dataclasses.asdict(SaccadeSpec()),
        "real": real, "before": before, "after": after,
        "before_vs_real": compare(real, before, real_ev, before_ev),
        "after_vs_real": compare(real, after, real_ev, after_ev),
        "time_s": time.perf_counter() - t0,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.json").write_text(json.dumps(result, indent=1) + "\n")
    figure(real, before, after, real_ev, before_ev, after_ev, out / "calibration.png")
    keys = [k for k in real if k != "rate_per_ms"]
    print(f"{'statistic':26s} {'real':>10s} {'before':>10s} {'after':>10s}")
    for k in keys:
        print(f"{k:26s} {real[k]:10.3f} {before[k]:10.3f} {after[k]:10.3f}")
    for k in result["after_vs_real"]:
        print(f"{k:26s} {'':10s} {result['before_vs_real'][k]:10.3f} {result['after_vs_real'][k]:10.3f}")
    return result


if __name__ == "__main__":
    main()
