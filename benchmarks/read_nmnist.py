"""Time reading and binning one real N-MNIST recording; save its event-count image.

    python benchmarks/read_nmnist.py out.png [--file PATH] [--repeats 200]

Reports the median over many repeats of: reading the .bin file, cropping 34 -> 32 and binning
into 1 ms frames (300, 2, 32, 32), and both together. The PNG shows the ON and OFF event
counts of the recording summed over time, which should look like the digit.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from threefactor.data.formats.nmnist_bin import read_bin  # noqa: E402
from threefactor.data.transforms import CenterCrop, Compose, ToFrame  # noqa: E402

DEFAULT_FILE = ROOT.parent / "shared" / "data" / "nmnist-small" / "Test" / "7" / "00001.bin"


def _median_us(fn, repeats: int) -> float:
    fn()  # warm up (page cache, numpy dispatch)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def _compare_with_tonic(path: Path, events: np.ndarray, repeats: int) -> None:
    """The same read and binning through Tonic, in the same run, when Tonic is installed."""
    try:
        import tonic
    except ImportError:
        print("tonic is not installed: no comparison (pip install tonic, constrained to the installed torch)")
        return
    dtype = tonic.datasets.NMNIST.dtype
    theirs = tonic.io.read_mnist_file(str(path), dtype=dtype)
    same = all(np.array_equal(theirs[f], events[f]) for f in "xytp")
    frames = tonic.transforms.Compose([
        tonic.transforms.CenterCrop((34, 34, 2), (32, 32)),
        tonic.transforms.ToFrame(sensor_size=(32, 32, 2), time_window=1000),
    ])
    read_us = _median_us(lambda: tonic.io.read_mnist_file(str(path), dtype=dtype), repeats)
    bin_us = _median_us(lambda: frames(theirs), repeats)
    print(f"tonic {tonic.__version__}, median of {repeats}: read {read_us:.0f} us, crop+bin {bin_us:.0f} us; "
          f"events identical to ours: {same}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("png", type=Path, help="where to save the event-count image")
    parser.add_argument("--file", type=Path, default=DEFAULT_FILE, help="an N-MNIST .bin recording")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args(argv)
    if not args.file.is_file():
        sys.exit(f"no recording at {args.file}: pass --file, or put the shared data at {DEFAULT_FILE.parents[3]}")

    to_frames = Compose([CenterCrop((34, 34, 2), (32, 32)), ToFrame((32, 32, 2), dt_us=1000, n_bins=300)])
    events = read_bin(args.file)
    read_us = _median_us(lambda: read_bin(args.file), args.repeats)
    bin_us = _median_us(lambda: to_frames(events), args.repeats)
    both_us = _median_us(lambda: to_frames(read_bin(args.file)), args.repeats)
    print(f"{args.file.name}: {len(events)} events, {events['t'].max() / 1000:.1f} ms")
    print(f"threefactor, median of {args.repeats}: read {read_us:.0f} us, crop+bin to (300, 2, 32, 32) "
          f"{bin_us:.0f} us, read+crop+bin {both_us:.0f} us")
    _compare_with_tonic(args.file, events, args.repeats)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.zeros((2, 34, 34))
    np.add.at(counts, (events["p"].astype(int), events["y"], events["x"]), 1)
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.2))
    for ax, img, title in zip(axes, (counts[1], counts[0], counts.sum(0)), ("ON", "OFF", "ON + OFF")):
        ax.imshow(img, cmap="gray")
        ax.set_title(f"{title} events")
        ax.axis("off")
    fig.suptitle(f"N-MNIST {args.file.parent.name}/{args.file.name}: {len(events)} events")
    fig.tight_layout()
    args.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=100)
    print(f"saved {args.png}")


if __name__ == "__main__":
    main()
