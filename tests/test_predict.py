"""``threefactor predict``: the class a run's network gives each of some recordings, framed as
the run framed its own test split, with no labels needed."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from threefactor.cli import main
from threefactor.config import load_config
from threefactor.data.events import make_events
from threefactor.errors import RunError
from threefactor.rules.common import predict_sequence
from threefactor.run.checkpoint import load_checkpoint
from threefactor.run.from_config import train
from threefactor.run.reopen import predict_files, run_test_split

from own_recordings import write_left_right_folder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run on a folder of own recordings (64 x 64 sensor, downsampled to 32 x 32)."""
    root = tmp_path_factory.mktemp("predict")
    write_left_right_folder(root / "rec", {"train": 8, "test": 4})
    cfg = load_config(None, [
        "data.dataset=folder", f"data.root={root / 'rec'}", "data.timesteps=20", "data.dt_us=2000",
        "data.downsample=2", "rule.burn_in=2", "train.epochs=2", "train.batch_size=4",
        "train.progress=false", "train.plots=false", "train.tensorboard=false",
        "network.layers=[{type: conv, channels: 4, kernel: 3, pool: 2}, {type: dense, channels: 8}]",
    ])
    train(cfg, root / "run", log=lambda *_: None)
    return root


def test_predictions_are_the_votes_on_the_runs_own_test_frames(run):
    """Files given one by one are framed as the test split was, so every layer's class is the
    one its votes on that split's frames give, recording for recording."""
    network, cfg, payload = load_checkpoint(run / "run")
    test = run_test_split(run / "run", cfg, payload)
    paths = [source for source, _ in test.sources]
    predictions = predict_files(run / "run", paths, device="cpu")
    votes = predict_sequence(network.eval(), test.frames.float(), None, cfg.rule.burn_in).votes
    assert [p.path for p in predictions] == paths
    for b, p in enumerate(predictions):
        assert p.classes == [test.classes[int(c)] for c in votes[:, b].argmax(1)]
        expected = (votes[:, b].max(1).values / votes[:, b].sum(1)).tolist()
        assert p.vote_share == pytest.approx(expected)
        assert all(0 < s <= 1 for s in p.vote_share)


def test_the_command_prints_one_line_per_file_and_json(run, capsys):
    files = sorted(str(p) for p in (run / "rec" / "test" / "left").glob("*.npy"))[:2]
    assert main(["predict", str(run / "run"), *files, "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line, path in zip(lines, files):
        assert re.fullmatch(rf"{re.escape(path)}\tlayer 2: (left|right) \(\d+ % of steps\)", line), line
    assert main(["predict", str(run / "run"), *files, "--all-layers", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in rows] == files and all(len(r["classes"]) == 2 for r in rows)


def test_a_bad_recording_is_refused_naming_it(run, tmp_path, capsys):
    good = str(next((run / "rec" / "test" / "left").glob("*.npy")))
    off = tmp_path / "off_sensor.npy"
    np.save(off, make_events(np.array([5, 70]), np.array([3, 3]), np.array([0, 10]), np.array([1, 0])))
    torn = tmp_path / "torn.bin"
    torn.write_bytes(b"\x01\x02\x03")
    for bad, what in ((off, "outside the 64 x 64"), (torn, "torn.bin"), (tmp_path / "missing.npy", "no such file")):
        assert main(["predict", str(run / "run"), good, str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("threefactor: error:") and "\n" not in err, err
        assert str(bad) in err and what in err, err


def test_a_run_without_a_sensor_cannot_frame_recordings(tmp_path):
    """The embedded dataset's runs record a sensor too; a checkpoint that lacks one is refused."""
    from threefactor.run.checkpoint import read_checkpoint, write_checkpoint

    cfg = load_config(None, ["data.n_train=8", "data.n_test=4", "data.timesteps=12", "rule.burn_in=2",
                             "train.epochs=0", "train.progress=false", "train.plots=false",
                             "train.tensorboard=false"])
    train(cfg, tmp_path / "run", log=lambda *_: None)
    payload = read_checkpoint(tmp_path / "run")
    payload["sensor_size"] = None
    for key in ("format", "version"):
        payload.pop(key)
    write_checkpoint(tmp_path / "run" / "checkpoint.pt", payload)
    with pytest.raises(RunError, match="does not record the sensor"):
        predict_files(tmp_path / "run", [tmp_path / "x.npy"])
