"""Helper of the tests that need a folder of a user's own recordings: not a test module."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from threefactor.data.events import make_events


def write_left_right_folder(root: Path, counts: dict[str, int], seed: int = 0, n_events: int = 300) -> Path:
    """``root/<split>/<left|right>/<i>.npy``: ``counts[split]`` recordings per class on a 64 x 64
    sensor, a bar of events sweeping left or right over 40 ms. Returns ``root``."""
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for label in ("left", "right"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                t = np.sort(rng.integers(0, 40_000, n_events))
                x = (t // 1000) if label == "right" else 63 - (t // 1000)
                np.save(folder / f"{i}.npy", make_events(np.clip(x, 0, 63), rng.integers(0, 64, n_events), t,
                                                         rng.integers(0, 2, n_events)))
    return root
