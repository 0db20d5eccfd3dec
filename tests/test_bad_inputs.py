"""Bad input is refused at the door, in one sentence, and nothing already written is lost.

Two tables hold most cases: command lines (``threefactor ...``, run in-process) with the exit
status and the message they must give, and library calls with the exception and its message.
Each row builds its input in a temporary folder; some then check what the command left behind.
After them come the cases a row cannot hold (two runs into one directory at once, a cache entry
gone stale) and property tests of the sensor bounds over event arrays.
"""

from __future__ import annotations

import atexit
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stall_point import stall_args, wait_for_marker
from threefactor.cli import main
from threefactor.config import ConfigError, load_config
from threefactor.data import (
    CachedDataset, DataFileError, DownloadError, EventFileError, EventFolder, NMNIST, ToFrame,
    download_url, extract_archive, read_aedat, read_bin, write_bin, write_shd,
)
from threefactor.data.datasets.base import EventDataset
from threefactor.data.events import first_outside_sensor, inside_sensor, make_events
from threefactor.data.formats.label_csv import read_segments_csv
from threefactor.data.transforms import to_frame
from threefactor.errors import RunError
from threefactor.run.checkpoint import CHECKPOINT_FORMAT, _seal, read_checkpoint

RUN = "run"  # the run directory of a row, under its temporary folder
COMMON = [
    "data.n_train=4", "data.n_test=2", "data.timesteps=6", "rule.burn_in=1", "data.cache_dir=null",
    "train.epochs=1", "train.batch_size=2", "train.eval_batch_size=2", "train.progress=false",
    "train.plots=false", "train.tensorboard=false", "device=cpu",
    "network.layers=[{type: dense, channels: 4}]",
]
# The embedded dataset, tiny: runs that get as far as training.
EMBEDDED = [
    "data.n_train=8", "data.n_test=4", "data.timesteps=8", "rule.burn_in=1", "train.epochs=1",
    "train.batch_size=4", "train.eval_batch_size=4", "train.progress=false", "train.plots=false",
    "train.tensorboard=false", "device=cpu",
    "network.layers.0.channels=4", "network.layers.1.channels=4", "network.layers.2.channels=4",
]


def _sets(settings_: list[str]) -> list[str]:
    return [a for s in settings_ for a in ("--set", s)]


def _train(tmp: Path, *settings_: str, base=COMMON) -> list[str]:
    return ["train", "--out", str(tmp / RUN), *_sets([*base, *settings_])]


def _events(rng: np.random.Generator, n: int = 120, width: int = 34, height: int = 34,
            duration_us: int = 6000) -> np.ndarray:
    return make_events(rng.integers(0, width, n), rng.integers(0, height, n),
                       np.sort(rng.integers(0, duration_us, n)), rng.integers(0, 2, n))


def _nmnist(tmp: Path, bad: dict[str, np.ndarray | bytes] | None = None) -> Path:
    """An N-MNIST folder (Train/<digit>/*.bin, Test/...), two digits, two files each; ``bad``
    replaces files by their path under the root with other events or raw bytes."""
    root = tmp / "nmnist"
    rng = np.random.default_rng(0)
    for split in ("Train", "Test"):
        for digit in (0, 1):
            (root / split / str(digit)).mkdir(parents=True)
            for k in range(2):
                write_bin(root / split / str(digit) / f"{k}.bin", _events(rng))
    for rel, content in (bad or {}).items():
        path = root / rel
        path.write_bytes(content) if isinstance(content, bytes) else write_bin(path, content)
    return root


def _folder(tmp: Path, layout: dict[str, list[np.ndarray]], labels_csv: str | None = None) -> Path:
    """A folder dataset: ``layout`` maps 'split/class' (or 'class') to the recordings in it."""
    root = tmp / "rec"
    for where, recordings in layout.items():
        (root / where).mkdir(parents=True, exist_ok=True)
        for k, ev in enumerate(recordings):
            np.save(root / where / f"{k}.npy", ev)
    if labels_csv is not None:
        root.mkdir(parents=True, exist_ok=True)
        (root / "labels.csv").write_text(labels_csv)
    return root


def _recordings(n: int = 3, width: int = 16, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [_events(rng, width=width, height=width) for _ in range(n)]


def _shd(tmp: Path, *, unit: int = 10, label: int = 1, times_as_strings: bool = False) -> Path:
    root = tmp / "shd"
    root.mkdir()
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        events = []
        for _ in range(4):
            ev = make_events(rng.integers(0, 700, 30), np.zeros(30), np.sort(rng.integers(0, 6000, 30)), np.zeros(30))
            events.append(ev)
        events[1]["x"][2] = unit
        write_shd(root / f"shd_{split}.h5", events, [0, label, 2, 3])
    if times_as_strings:
        with h5py.File(root / "shd_train.h5", "r+") as f:
            del f["spikes/times"]
            f.create_dataset("spikes/times", data=np.array(["0.001 0.002"] * 4, dtype=object),
                             dtype=h5py.string_dtype())
    return root


_FINISHED: list[Path] = []  # one finished run, made once and copied for every row that needs one


def _finished_run(tmp: Path) -> Path:
    if not _FINISHED:
        made = Path(tempfile.mkdtemp(prefix="finished-")) / RUN
        atexit.register(shutil.rmtree, made.parent, True)
        assert main(["train", "--out", str(made), *_sets(EMBEDDED)]) == 0
        _FINISHED.append(made)
    shutil.copytree(_FINISHED[0], tmp / RUN)
    return tmp / RUN


def _laughs(tmp: Path) -> Path:
    """Nested YAML anchors: 396 bytes that stand for a value of 9**7 items."""
    names = ["distributed: {sync: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]}"]
    previous = "a"
    for key, anchor in (("train: {plots", "b"), ("optim: {name", "c"), ("rule: {name", "d"),
                        ("network: {surrogate", "e"), ("data: {root", "f")):
        names.append(f"{key}: &{anchor} [{', '.join(['*' + previous] * 9)}]}}")
        previous = anchor
    names.append(f"device: &g [{', '.join(['*f'] * 9)}]")
    names.append(f"seed: [{', '.join(['*g'] * 9)}]")
    path = tmp / "laughs.yaml"
    path.write_text("\n".join(names) + "\n")
    return path


# --- what a row checks afterwards -------------------------------------------------------------


def _nothing_left(tmp: Path) -> None:
    assert not (tmp / RUN).exists(), sorted(p.name for p in (tmp / RUN).iterdir())


def _good_checkpoint_kept(tmp: Path) -> None:
    from threefactor.run.checkpoint import load_checkpoint

    network, _, payload = load_checkpoint(tmp / RUN)
    assert payload["progress"]["batches_total"] == 0  # the initial weights, before the blow-up
    assert all(torch.isfinite(p).all() and p.abs().max() < 100 for p in network.parameters())
    assert not list((tmp / RUN).glob("*.tmp")) and not list((tmp / RUN).glob(".*.tmp"))


def _half_made(tmp: Path) -> None:
    """What a start killed during its data loading used to leave: config.yaml, empty metrics."""
    run = tmp / RUN
    run.mkdir()
    from threefactor.config import dump_config

    (run / "config.yaml").write_text(dump_config(load_config(None, EMBEDDED)))
    (run / "metrics.jsonl").write_bytes(b"")


def _completed(tmp: Path) -> None:
    assert (tmp / RUN / "checkpoint.pt").is_file() and (tmp / RUN / "summary.json").is_file()


@dataclass
class Row:
    name: str
    argv: Callable[[Path], list[str]]
    status: int
    message: str  # a regex: searched in the one stderr line (status 2) or in stdout (status 0)
    then: Callable[[Path], None] | None = None
    setup: Callable[[Path], None] | None = None


OUTSIDE = r"lies outside the {} sensor with {}; to skip such events, set outside_sensor to 'drop'"
ROWS = [
    # 1. one class list for every split
    Row("folder: a test class the training split lacks",
        lambda t: _train(t, "data.dataset=folder", f"data.root={_folder(t, {'train/a': _recordings(), 'train/b': _recordings(), 'test/a': _recordings(), 'test/c': _recordings()})}"),
        2, r"the test split has class 'c' \(.*rec/test/c/0\.npy\) that the training split .*rec/train lacks \(its classes: 'a', 'b'\)",
        _nothing_left),
    Row("folder: a test split without the first class keeps the training split's indices",
        lambda t: _train(t, "data.dataset=folder", "data.n_test=4", f"data.root={_folder(t, {'train/0': _recordings(), 'train/1': _recordings(), 'train/2': _recordings(), 'test/1': _recordings(2), 'test/2': _recordings(2)})}"),
        0, r"3 classes", lambda t: _test_labels_are(t, ["1", "1", "2", "2"])),
    Row("folder: a class outside the declared data.classes",
        lambda t: _train(t, "data.dataset=folder", "data.classes=[a]", f"data.root={_folder(t, {'train/a': _recordings(), 'train/b': _recordings(), 'test/a': _recordings()})}"),
        2, r"class 'b' of .*train/b/0\.npy is not in data\.classes \('a'\)", _nothing_left),
    # 2. events off the sensor
    Row("nmnist: an event at x = 40 on the 34 x 34 sensor",
        lambda t: _train(t, "data.dataset=nmnist", "data.crop=32", f"data.root={_nmnist(t, {'Train/1/0.bin': make_events([3, 40], [5, 5], [10, 20], [1, 1])})}"),
        2, r"cannot read .*Train/1/0\.bin: event 1 \(x 40, y 5, p 1, t 20 us\) " + OUTSIDE.format("34 x 34", "2 polarities"),
        _nothing_left),
    Row("nmnist: a file of random bytes, with crop 32",
        lambda t: _train(t, "data.dataset=nmnist", "data.crop=32", "data.n_test=4", f"data.root={_nmnist(t, {'Test/0/1.bin': np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes()})}"),
        2, r"cannot read .*Test/0/1\.bin: event \d+ \(x \d+, y \d+, p \d, t \d+ us\) " + OUTSIDE.format("34 x 34", "2 polarities")),
    Row("nmnist: data.outside_sensor drop drops the event and says how many",
        lambda t: _train(t, "data.dataset=nmnist", "data.outside_sensor=drop", f"data.root={_nmnist(t, {'Train/1/0.bin': make_events([3, 40, 50], [5, 5, 5], [10, 20, 30], [1, 1, 0])})}"),
        0, r"warning: dropped 2 events outside the 34 x 34 sensor with 2 polarities from 1 of the 4 nmnist train recordings"),
    Row("shd: unit 750 of 700",
        lambda t: _train(t, "data.dataset=shd", f"data.root={_shd(t, unit=750)}"),
        2, r"cannot read .*shd_train\.h5: event 2 \(x 750, y 0, p 0, t \d+ us\) of sample 1 " + OUTSIDE.format("700 x 1", "1 polarity")),
    # 3. one sensor, from the training split, checked on every split
    Row("folder: a test event beyond the sensor inferred from the training split",
        lambda t: _train(t, "data.dataset=folder", f"data.root={_folder(t, {'train/a': [make_events([0, 31], [0, 31], [0, 1], [0, 1])] * 2, 'test/a': [make_events([32], [3], [5], [0])]})}"),
        2, r"cannot read .*test/a/0\.npy: event 0 \(x 32, y 3, p 0, t 5 us\) " + OUTSIDE.format("32 x 32", "2 polarities")),
    Row("folder: one event at x = 30000",
        lambda t: _train(t, "data.dataset=folder", f"data.root={_folder(t, {'train/a': [make_events([3, 30000], [2, 20], [0, 1], [0, 1])] * 2, 'test/a': _recordings(1)})}"),
        2, r"the sensor of .*rec/train would be 30001 x 21, inferred from the largest x = 30000 in .*rec/train/a/0\.npy and y = 20 in .*: larger than any event camera \(4096 pixels a side\), so a stray coordinate; fix that file, or declare data\.sensor_size"),
    Row("folder: frames too large to bin",
        lambda t: _train(t, "data.dataset=folder", "data.sensor_size=[4000, 4000, 2]", "data.timesteps=60", f"data.root={_folder(t, {'train/a': _recordings(), 'test/a': _recordings()})}"),
        2, r"one sample's frames would hold 60 x 2 x 4000 x 4000 = 1,920,000,000 counts .* lower data\.timesteps or crop or downsample", _nothing_left),
    Row("folder: a network that does not fit the frames",
        lambda t: _train(t, "data.dataset=folder", "data.sensor_size=[8, 8, 2]", f"data.root={_folder(t, {'train/a': _recordings(2, 8), 'test/a': _recordings(1, 8)})}", "network.layers=[{type: conv, channels: 2, kernel: 3, pool: 16}]"),
        2, r"cannot build the network for inputs of shape \[2, 8, 8\]: network\.layers\.0", _nothing_left),
    # 4. labels
    Row("shd: label 25 of 20 classes",
        lambda t: _train(t, "data.dataset=shd", f"data.root={_shd(t, label=25)}"),
        2, r"cannot read .*shd_train\.h5: sample 1 has label 25, but SHD has only 20 classes \(labels 0\.\.19\)"),
    Row("shd: spike times stored as strings",
        lambda t: _train(t, "data.dataset=shd", f"data.root={_shd(t, times_as_strings=True)}"),
        2, r"cannot read .*shd_train\.h5: its 'spikes/times' hold strings, not numbers"),
    # 5. empty recordings, labels.csv outside the root
    Row("folder: some recordings are empty",
        lambda t: _train(t, "data.dataset=folder", "data.n_train=10", f"data.root={_folder(t, {'train/a': [*_recordings(2), make_events([], [], [], [])], 'train/b': _recordings(2), 'test/a': _recordings(2)})}"),
        0, r"warning: 1 of the 5 folder train recordings have no events \(the first: .*train/a/2\.npy\); they are kept as all-zero inputs"),
    Row("folder: every recording is empty",
        lambda t: _train(t, "data.dataset=folder", f"data.root={_folder(t, {'train/a': [make_events([], [], [], [])] * 2, 'test/a': [make_events([], [], [], [])]})}"),
        2, r"rec/train: all 2 of its recordings are empty \(no events\)", _nothing_left),
    Row("folder: every recording is empty (sensor declared)",
        lambda t: _train(t, "data.dataset=folder", "data.sensor_size=[16, 16, 2]", f"data.root={_folder(t, {'train/a': [make_events([], [], [], [])] * 2, 'test/a': _recordings(1)})}"),
        2, r"all 2 folder train recordings are empty \(no events\), e\.g\. .*train/a/0\.npy: there is nothing to learn from"),
    Row("folder: labels.csv names a file outside the folder (../)",
        lambda t: _train(t, "data.dataset=folder", f"data.root={_folder(t, {'x': _recordings(1)}, labels_csv='x/0.npy,a' + chr(10) + '../secret.npy,b' + chr(10))}"),
        2, r"cannot read .*rec/labels\.csv: row 2 names '\.\./secret\.npy', which is not inside .*rec; list files by their path relative to the folder"),
    Row("folder: labels.csv names an absolute path",
        lambda t: _train(t, "data.dataset=folder", f"data.root={_folder(t, {'x': _recordings(1)}, labels_csv='/etc/passwd,a' + chr(10))}"),
        2, r"row 1 names '/etc/passwd', which is not inside"),
    # 12. the same samples for training and testing
    Row("folder: train and test are the same files",
        lambda t: _train(t, "data.dataset=folder", "data.n_test=4", f"data.root={_folder(t, {'a': _recordings(2), 'b': _recordings(2)})}"),
        0, r"warning: 4 of the 4 test samples are training samples too \(the same recordings\), so the test accuracy does not measure generalisation; give .*rec train/ and test/ subfolders"),
    Row("folder: only a test/ subfolder",
        lambda t: _train(t, "data.dataset=folder", f"data.root={_folder(t, {'test/a': _recordings(2), 'a': _recordings(2)})}"),
        2, r"rec has a test/ folder but no train/ folder: give it both, or neither"),
    # 7. a start that fails leaves nothing behind
    Row("a start whose data is missing",
        lambda t: _train(t, "data.dataset=nmnist", f"data.root={t / 'nowhere'}"),
        2, r"N-MNIST train split not found: looked for .*nowhere/Train/<digit>/\*\.bin", _nothing_left),
    Row("a half-made run (config.yaml, no checkpoint) is started again by --resume",
        lambda t: ["train", "--resume", str(t / RUN)], 0,
        r"has no checkpoint yet \(its run stopped before the first one\): starting it from its config\.yaml",
        _completed, _half_made),
    Row("a half-made run is reused by the same command",
        lambda t: ["train", "--out", str(t / RUN), *_sets(EMBEDDED)], 0, r"done in", _completed, _half_made),
    Row("a directory with metrics rows but no checkpoint is not overwritten",
        lambda t: ["train", "--out", str(t / RUN), *_sets(EMBEDDED)], 2,
        r"holds metrics rows \(metrics\.jsonl\) but no checkpoint\.pt, so its run can be neither continued nor overwritten safely",
        lambda t: _rows_kept(t), lambda t: _with_rows(t)),
    # 8. divergence that is still finite
    Row("optim.lr 1e6 with sgd",
        lambda t: _train(t, "optim.name=sgd", "optim.lr=1e6", base=EMBEDDED),
        2, r"the run diverged in epoch 1, batch 1: the weight norm of layer \d grew to [\d.e+]+, over 1000 times its "
           r"running value [\d.]+; it was stopped and the last good checkpoint \(from before the first batch\) is kept "
           r"in .*checkpoint\.pt; lower optim\.lr \(now 1e\+06\), or raise train\.divergence_factor \(now 1000\)",
        _good_checkpoint_kept),
    Row("optim.lr 1e30 with adamax",
        lambda t: _train(t, "optim.name=adamax", "optim.lr=1e30", base=EMBEDDED),
        2, r"the run diverged in epoch 1, batch 1: the weight norm of layer \d grew to [\d.e+]+, .*lower optim\.lr \(now 1e\+30\)",
        _good_checkpoint_kept),
    Row("optim.lr .inf", lambda t: _train(t, "optim.lr=.inf"), 2,
        r"'optim\.lr' must be a finite number, got inf", _nothing_left),
    Row("network.readout_scale .nan", lambda t: _train(t, "network.readout_scale=.nan"), 2,
        r"'network\.readout_scale' must be a finite number, got nan", _nothing_left),
    Row("train.divergence_factor below 1", lambda t: _train(t, "train.divergence_factor=0.5"), 2,
        r"'train\.divergence_factor' must be > 1"),
    # 9. config errors: short, and every size setting checked at load time
    Row("nested YAML anchors", lambda t: ["train", "--config", str(_laughs(t)), "--out", str(t / RUN)], 2,
        r"laughs\.yaml: 'seed' must be an integer, got \[\[\[\.\.\.\], .{0,80}$", _nothing_left),
    Row("a negative crop", lambda t: _train(t, "data.dataset=nmnist", "data.root=x", "data.crop=-2"), 2,
        r"'data\.crop' must be > 0 or null \(no crop\), got -2"),
    Row("a crop larger than the sensor", lambda t: _train(t, "data.dataset=nmnist", "data.root=x", "data.crop=40"), 2,
        r"'data\.crop' \(40\) is larger than the 34 x 34 frames of nmnist"),
    Row("a crop larger than the downsampled sensor",
        lambda t: _train(t, "data.dataset=dvsgesture", "data.root=x", "data.downsample=4", "data.crop=40"), 2,
        r"'data\.crop' \(40\) is larger than the 32 x 32 frames of dvsgesture after 'data\.downsample' 4"),
    Row("a downsample larger than the sensor", lambda t: _train(t, "data.dataset=nmnist", "data.root=x", "data.downsample=40"), 2,
        r"'data\.downsample' \(40\) is larger than the 34 x 34 sensor of nmnist, so no pixel would be left"),
    Row("a crop on SHD's 700 x 1 channels", lambda t: _train(t, "data.dataset=shd", "data.root=x", "data.crop=2"), 2,
        r"'data\.crop' \(2\) is larger than the 700 x 1 frames of shd"),
    Row("a negative test length", lambda t: _train(t, "data.dataset=nmnist", "data.root=x", "data.test_timesteps=-5"), 2,
        r"'data\.test_timesteps' must be > 0 or null"),
    Row("a test length within the burn-in", lambda t: _train(t, "data.dataset=nmnist", "data.root=x", "data.test_timesteps=1"), 2,
        r"'rule\.burn_in' \(1\) must be below data\.test_timesteps \(1\), or no test step would be scored"),
    Row("a crop on the embedded dataset", lambda t: _train(t, "data.crop=16", base=EMBEDDED), 2,
        r"'data\.crop' applies to recorded datasets, not to 'embedded'"),
    Row("a sensor size for a dataset with its own", lambda t: _train(t, "data.dataset=nmnist", "data.root=x", "data.sensor_size=[34, 34, 2]"), 2,
        r"'data\.sensor_size' is for data\.dataset 'folder'; 'nmnist' has its own"),
    Row("a config file that is /dev/zero", lambda t: ["train", "--config", "/dev/zero"], 2,
        r"/dev/zero: larger than 1 MiB, so not a config file"),
    Row("a config file with a python tag", lambda t: ["train", "--config", str(_write(t / "c.yaml", "seed: !!python/object/apply:os.system [echo hi]\n"))], 2,
        r"c\.yaml: not valid YAML at line 1"),
    # 10. plot and checkpoints that are not files
    Row("plot of a run whose checkpoint is a link to /dev/zero", lambda t: ["plot", str(_zero_checkpoint(t))], 2,
        r"checkpoint\.pt: refused, it is a character device, not a checkpoint file"),
    Row("--resume of a run whose checkpoint is a link to /dev/zero", lambda t: ["train", "--resume", str(_zero_checkpoint(t))], 2,
        r"checkpoint\.pt: refused, it is a character device, not a checkpoint file"),
    Row("export of a checkpoint that is a link to /dev/zero", lambda t: ["export", str(_zero_checkpoint(t) / "checkpoint.pt"), str(t / "x.nir")], 2,
        r"checkpoint\.pt: refused, it is a character device, not a checkpoint file"),
    Row("plot into a run whose plots/ cannot be written", lambda t: ["plot", str(_unwritable_plots(t))], 2,
        r"cannot write the plots into .*run/plots: Permission denied"),
    # what already held: tampered checkpoints, a run not overwritten
    Row("--resume of a checkpoint with a flipped byte", lambda t: ["train", "--resume", str(_tampered(t, flip=True))], 2,
        r"checkpoint\.pt: refused, its bytes do not match the sha256 sealed into it \(the file was altered or corrupted\)"),
    Row("plot of a truncated checkpoint", lambda t: ["plot", str(_tampered(t, flip=False))], 2,
        r"checkpoint\.pt: refused, the file is truncated or damaged or was not written by this threefactor"),
    Row("a new run into a finished one", lambda t: ["train", "--out", str(_finished_run(t)), *_sets(EMBEDDED)], 2,
        r"run already holds a run \(checkpoint\.pt\); continue it with --resume"),
]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _zero_checkpoint(tmp: Path) -> Path:
    run = tmp / "zero"
    run.mkdir()
    from threefactor.config import dump_config

    (run / "config.yaml").write_text(dump_config(load_config(None, EMBEDDED)))
    (run / "checkpoint.pt").symlink_to("/dev/zero")
    return run


def _unwritable_plots(tmp: Path) -> Path:
    run = _finished_run(tmp)
    # Root writes through any permission bits, so plots/ is a directory that even root cannot
    # write to: a link into sysfs.
    (run / "plots").symlink_to("/sys")
    return run


def _tampered(tmp: Path, flip: bool) -> Path:
    run = _finished_run(tmp)
    data = bytearray((run / "checkpoint.pt").read_bytes())
    if flip:
        data[len(data) // 2] ^= 0x04
    else:
        data = data[: len(data) // 3]
    (run / "checkpoint.pt").write_bytes(bytes(data))
    return run


def _with_rows(tmp: Path) -> None:
    (tmp / RUN).mkdir()
    (tmp / RUN / "metrics.jsonl").write_text('{"epoch": 1, "split": "train", "layer": 1}\n')


def _rows_kept(tmp: Path) -> None:
    assert (tmp / RUN / "metrics.jsonl").read_text() == '{"epoch": 1, "split": "train", "layer": 1}\n'
    assert sorted(p.name for p in (tmp / RUN).iterdir()) == ["metrics.jsonl"]


def _test_labels_are(tmp: Path, names: list[str]) -> None:
    from threefactor.run.from_config import load_data

    cfg = load_config(tmp / RUN / "config.yaml")
    train, test = load_data(cfg)
    assert train.classes == test.classes == ("0", "1", "2")
    assert [test.classes[i] for i in test.labels.tolist()] == names


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_command_line(row: Row, tmp_path: Path, capsys) -> None:
    if row.setup is not None:
        row.setup(tmp_path)
    argv = row.argv(tmp_path)
    capsys.readouterr()
    t0 = time.perf_counter()
    status = main(argv)
    elapsed = time.perf_counter() - t0
    out, err = capsys.readouterr()
    assert status == row.status, err or out
    if status == 2:
        assert "Traceback" not in err
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("threefactor: error: "), err
        assert len(lines[0]) < 600, lines[0][:600]
        assert re.search(row.message, lines[0]), lines[0]
    else:
        assert re.search(row.message, out), out
    assert elapsed < 30, f"{row.name} took {elapsed:.0f} s"
    if row.then is not None:
        row.then(tmp_path)


# --- library calls: the exception and its message ---------------------------------------------


def _zip_slip(tmp: Path) -> None:
    with zipfile.ZipFile(tmp / "evil.zip", "w") as z:
        z.writestr("../../escaped.txt", "x")
    extract_archive(tmp / "evil.zip", tmp / "out")


def _checksum_mismatch(tmp: Path) -> None:
    (tmp / "data.zip").write_bytes(b"not what was promised")
    download_url((tmp / "data.zip").as_uri(), tmp / "dl" / "data.zip", md5="0" * 32, progress=False)


def _unpickling(tmp: Path) -> None:
    class NotPlainData:
        def __reduce__(self):
            return (print, ("this must never run",))

    buf = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "version": 2, "evil": NotPlainData()}, buf)
    (tmp / "evil.pt").write_bytes(_seal(buf.getvalue()))
    read_checkpoint(tmp / "evil.pt")


LIBRARY = [
    ("to_frame: an event off the sensor",
     lambda t: to_frame(make_events([1, 40], [2, 2], [0, 5], [0, 1]), (34, 34, 2), 1000, 3),
     ValueError, r"^event 1 \(x 40, y 2, p 1, t 5 us\) lies outside the 34 x 34 sensor with 2 polarities$"),
    ("to_frame: a negative y", lambda t: ToFrame((8, 8, 2), 1000, 2)(make_events([1], [-1], [0], [0])),
     ValueError, r"event 0 \(x 1, y -1, p 0, t 0 us\) lies outside the 8 x 8 sensor"),
    ("to_frame: polarity 2 on a 2-polarity sensor", lambda t: to_frame(make_events([1], [1], [0], [2]), (8, 8, 2), 1000, 2),
     ValueError, r"event 0 \(x 1, y 1, p 2, t 0 us\) lies outside"),
    ("NMNIST: dataset[i] of a file with an event at y = 35",
     lambda t: NMNIST(_nmnist(t, {"Train/0/0.bin": make_events([1], [35], [3], [0])}))[0],
     EventFileError, r"Train/0/0\.bin: event 0 \(x 1, y 35, p 0, t 3 us\) lies outside the 34 x 34 sensor"),
    ("EventFolder: labels.csv with ../", lambda t: EventFolder(_folder(t, {"x": _recordings(1)}, "../x/0.npy,a\n")),
     DataFileError, r"labels\.csv: row 1 names '\.\./x/0\.npy', which is not inside"),
    ("EventFolder: a class outside the classes given",
     lambda t: EventFolder(_folder(t, {"a": _recordings(1), "b": _recordings(1)}), classes=["a"]),
     ValueError, r"rec: class 'b' \(of .*rec/b/0\.npy\) is not one of the 1 classes it was given \('a'\)"),
    ("zip-slip: an archive member that climbs out", _zip_slip, DownloadError,
     r"evil\.zip holds a path outside its folder: '\.\./\.\./escaped\.txt'"),
    ("a download whose checksum does not match", _checksum_mismatch, DownloadError,
     r"the md5 checksum of file://.* is [0-9a-f]+, expected 0+, so the download was discarded"),
    ("a sealed checkpoint holding a pickled object", _unpickling, RunError,
     r"evil\.pt: refused, it holds objects other than tensors and plain data"),
    ("AEDAT: random bytes", lambda t: read_aedat(_write(t / "x.aedat", "garbage")), EventFileError,
     r"x\.aedat: it does not start with an '#!AER-DAT' line"),
    ("N-MNIST: 7 bytes", lambda t: read_bin(_write(t / "x.bin", "1234567")), EventFileError,
     r"x\.bin: its 7 bytes are not a whole number of 5-byte N-MNIST records"),
    ("labels csv: an end before its start", lambda t: read_segments_csv(_write(t / "l.csv", "a,10,5\n")), DataFileError,
     r"l\.csv: line 1 has no class or an end time before its start time"),
    ("SHD: not HDF5", lambda t: __import__("threefactor.data.formats.shd_hdf5").data.formats.shd_hdf5.SHDFile(_write(t / "s.h5", "nope")),
     EventFileError, r"s\.h5: it is not a readable HDF5 file"),
    ("a --set key that does not exist", lambda t: load_config(None, ["optim.lrr=1"]), ConfigError,
     r"unknown key 'optim\.lrr' \(did you mean 'lr'\?\)"),
    ("a 100 kB value for a number", lambda t: load_config(None, ["optim.lr=" + "x" * 100_000]), ConfigError,
     r"^config with --set overrides: 'optim\.lr' must be a number, got 'x+\.\.\.x+'$"),
    ("a 100 kB value for a key that does not exist", lambda t: load_config(None, ["optim.lrr=" + "x" * 100_000]),
     ConfigError, r"^--set optim\.lrr=x{60,75}\.\.\.: unknown key 'optim\.lrr'"),
]


@pytest.mark.parametrize("name, call, error, message", LIBRARY, ids=[c[0] for c in LIBRARY])
def test_library_call(name, call, error, message, tmp_path: Path, capsys) -> None:
    with pytest.raises(error) as caught:
        call(tmp_path)
    text = str(caught.value)
    assert "\n" not in text and re.search(message, text), text
    assert "this must never run" not in capsys.readouterr().out


def test_nested_anchors_are_refused_fast_and_short(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as caught:
        load_config(_laughs(tmp_path))
    assert time.perf_counter() - t0 < 2.0
    assert len(str(caught.value)) < 200


# --- a run directory is held by one run ---------------------------------------------------------


def test_a_second_run_into_a_running_one_is_refused_and_the_first_goes_on(tmp_path: Path, capsys) -> None:
    run, marker = tmp_path / RUN, tmp_path / "stalled"
    settings_ = [*EMBEDDED, "train.checkpoint_every=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, *stall_args("batch", 1, marker), "train", "--out", str(run), *_sets(settings_)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_for_marker(first, marker, 120)
        before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
        for argv in (["train", "--out", str(run), *_sets(settings_)], ["train", "--resume", str(run)]):
            assert main(argv) == 2
            line = capsys.readouterr().err.strip()
            assert re.fullmatch(
                rf"threefactor: error: {re.escape(str(run))} is in use by another threefactor run "
                rf"\(pid {first.pid} on .+, since .+\); wait for it to end or choose another --out", line), line
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=30)
    # kill -9 released the lock: the run goes on from its checkpoint, with no temporary file left
    assert main(["train", "--resume", str(run)]) == 0
    assert json.loads((run / "summary.json").read_text())["resumes"] == 1
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.yaml", "metrics.jsonl", "summary.json"]


def test_a_start_that_fails_keeps_a_directory_it_did_not_make(tmp_path: Path, capsys) -> None:
    run = tmp_path / RUN
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    assert main(_train(tmp_path, "data.dataset=nmnist", f"data.root={tmp_path / 'nowhere'}")) == 2
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


# --- the cache never serves a stale entry -------------------------------------------------------


def test_a_cache_entry_is_recomputed_when_its_file_changes_in_place(tmp_path: Path) -> None:
    root = _nmnist(tmp_path)
    ds = NMNIST(root)
    path = ds.files[0]
    frames = ToFrame((34, 34, 2), 1000, 7)
    cached = CachedDataset(ds, tmp_path / "cache", frames)
    first = cached[0][0]
    ev = read_bin(path)
    ev["x"] = 33 - ev["x"]  # same size, other content
    st_before = os.stat(path)
    write_bin(path, ev)
    os.utime(path, ns=(st_before.st_atime_ns, st_before.st_mtime_ns))
    assert os.stat(path).st_size == st_before.st_size and os.stat(path).st_mtime_ns == st_before.st_mtime_ns
    again = cached[0][0]
    assert not np.array_equal(first, again)
    assert np.array_equal(again, frames(read_bin(path)))


def test_a_cache_entry_copied_over_another_is_not_served(tmp_path: Path) -> None:
    ds = NMNIST(_nmnist(tmp_path))
    frames = ToFrame((34, 34, 2), 1000, 7)
    cached = CachedDataset(ds, tmp_path / "cache", frames)
    a, b = cached[0][0], cached[1][0]
    assert not np.array_equal(a, b)
    cached.path(1).write_bytes(cached.path(0).read_bytes())  # entry 0 copied over entry 1
    assert np.array_equal(cached[1][0], b)


# --- property tests of the sensor bounds --------------------------------------------------------


@st.composite
def _wild_events(draw):
    """Events with coordinates and polarities anywhere in their fields' range, and a sensor."""
    n = draw(st.integers(0, 40))
    coords = st.integers(-5, 60) | st.sampled_from([-32768, 32767])
    x = draw(st.lists(coords, min_size=n, max_size=n))
    y = draw(st.lists(coords, min_size=n, max_size=n))
    p = draw(st.lists(st.integers(-2, 3) | st.sampled_from([-128, 127]), min_size=n, max_size=n))
    t = draw(st.lists(st.integers(0, 20_000), min_size=n, max_size=n))
    sensor = (draw(st.integers(1, 50)), draw(st.integers(1, 50)), draw(st.sampled_from([1, 2])))
    return make_events(x, y, sorted(t), p), sensor


def _reference_inside(e, sensor) -> bool:
    w, h, n_pol = sensor
    return 0 <= e["x"] < w and 0 <= e["y"] < h and 0 <= e["p"] < (2 if n_pol == 1 else n_pol)


@given(_wild_events())
@settings(max_examples=300, deadline=None)
def test_first_outside_sensor_is_the_first_event_a_plain_loop_finds(case) -> None:
    events, sensor = case
    expected = next((i for i, e in enumerate(events) if not _reference_inside(e, sensor)), None)
    assert first_outside_sensor(events, sensor) == expected
    assert inside_sensor(events, sensor).tolist() == [_reference_inside(e, sensor) for e in events]


@given(_wild_events(), st.integers(1, 30))
@settings(max_examples=200, deadline=None)
def test_to_frame_counts_every_event_in_its_pixel_or_refuses(case, n_bins) -> None:
    events, sensor = case
    dt = 1000
    if any(not _reference_inside(e, sensor) for e in events):
        with pytest.raises(ValueError, match="lies outside the"):
            to_frame(events, sensor, dt, n_bins)
        return
    frames = to_frame(events, sensor, dt, n_bins)
    assert frames.shape == (n_bins, sensor[2], sensor[1], sensor[0])
    expected = np.zeros_like(frames)
    for e in events:
        b = int(e["t"]) // dt
        if b < n_bins:
            expected[b, 0 if sensor[2] == 1 else int(e["p"]), int(e["y"]), int(e["x"])] += 1
    assert np.array_equal(frames, expected)


class _InMemory(EventDataset):
    def __init__(self, events, sensor, outside_sensor):
        self._events, self.sensor_size, self.outside_sensor = events, sensor, outside_sensor
        self.targets = np.zeros(1, dtype=np.int64)

    def events(self, i):
        return self._events

    def source(self, i):
        return "memory.npy", None


@given(_wild_events())
@settings(max_examples=200, deadline=None)
def test_a_dataset_drops_exactly_the_events_off_its_sensor_or_names_the_first(case) -> None:
    events, sensor = case
    inside = [_reference_inside(e, sensor) for e in events]
    kept, dropped = _InMemory(events, sensor, "drop").checked_events(0)
    assert np.array_equal(kept, events[np.asarray(inside, dtype=bool)]) and dropped == inside.count(False)
    strict = _InMemory(events, sensor, "error")
    if all(inside):
        assert np.array_equal(strict[0][0], events)
    else:
        first = inside.index(False)
        with pytest.raises(EventFileError, match=rf"memory\.npy: event {first} \(x {events['x'][first]}, "):
            strict[0]
