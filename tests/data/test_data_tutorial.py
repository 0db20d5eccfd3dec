"""Runs the python blocks of docs/tutorial-own-recordings.md on a folder this test writes."""

from __future__ import annotations

import re

import numpy as np

from data_helpers import REPO_ROOT
from threefactor.data.formats import aedat, label_csv
from threefactor.data.events import make_events

TUTORIAL = REPO_ROOT / "docs" / "tutorial-own-recordings.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", TUTORIAL.read_text(), flags=re.S)


def _recording(rng, n=3000, duration_us=400_000):
    # A bar sweeping across a 128 x 128 sensor plus a little noise: enough structure to
    # survive Denoise, like a real gesture.
    t = np.sort(rng.integers(0, duration_us, n))
    x = (t * 100 // duration_us + rng.integers(0, 3, n)).clip(0, 127)
    y = rng.integers(30, 90, n)
    return make_events(x, y, t, rng.integers(0, 2, n))


def test_tutorial_runs(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    root = tmp_path / "my_recordings"
    for cls in ("wave", "clap"):
        (root / cls).mkdir(parents=True)
        for k in (1, 2):
            np.save(root / cls / f"take{k}.npy", _recording(rng))
    session = np.concatenate([_recording(rng), _recording(rng)])
    session["t"][3000:] += 500_000
    aedat.write_aedat(root / "session3.aedat", session)
    label_csv.write_labels_csv(root / "session3_labels.csv", [("wave", 0, 400_000), ("clap", 500_000, 900_000)])

    blocks = _blocks()
    assert len(blocks) >= 5
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for code in blocks:
        exec(compile(code, str(TUTORIAL), "exec"), namespace)
    assert len(namespace["raw"]) == 6
    assert (tmp_path / "cache" / "my_recordings").is_dir()
