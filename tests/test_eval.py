"""``threefactor eval``: a run's per-layer accuracy and confusion matrices, on its test split or
on other data of the same classes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from threefactor.cli import main
from threefactor.config import load_config
from threefactor.run.reopen import evaluate_run
from threefactor.run.from_config import train

TINY = ["data.n_train=24", "data.n_test=12", "data.timesteps=16", "rule.burn_in=3", "train.epochs=1",
        "train.batch_size=12", "train.progress=false", "train.plots=false", "train.tensorboard=false",
        "network.layers.0.channels=4", "network.layers.1.channels=4", "network.layers.2.channels=4"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    train(load_config(overrides=TINY), out, log=lambda m: None)
    return out


def test_eval_gives_the_accuracy_the_run_reported(run):
    result = evaluate_run(run)
    summary = json.loads((run / "summary.json").read_text())
    assert result.samples == 12
    assert result.accuracy == pytest.approx(list(summary["test_accuracy"].values()), abs=1e-6)
    assert result.loss == pytest.approx(list(summary["test_loss"].values()), rel=1e-5)
    # every sample is counted once per layer, and the diagonal is what it got right
    assert result.confusion.shape == (3, 8, 8) and (result.confusion.sum((1, 2)) == 12).all()
    diagonal = np.trace(result.confusion, axis1=1, axis2=2)
    assert list(diagonal / 12) == pytest.approx(result.accuracy)


def test_eval_on_other_data_of_the_same_classes(run):
    result = evaluate_run(run, ["data.n_test=5"])
    assert result.samples == 5 and (result.confusion.sum((1, 2)) == 5).all()


def test_eval_command_prints_every_layer_and_draws_the_confusion(run, tmp_path, capsys):
    assert main(["eval", str(run), "--out", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "12 test samples, 8 classes" in out and "layer 3: accuracy" in out
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_refuses_a_typo_in_one_line(run, capsys):
    assert main(["eval", str(run), "--set", "data.n_tst=5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("threefactor: error: --set data.n_tst=5: unknown key 'data.n_tst'") and "\n" not in err
