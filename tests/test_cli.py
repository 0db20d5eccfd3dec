"""The command line: bad input is one line on stderr and exit code 2; a run writes its directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from threefactor.cli import main
from threefactor.config import dump_config, load_config
from threefactor.rules.common import resolve_loss
from threefactor.run.checkpoint import load_checkpoint
from threefactor.run.from_config import FrameBatches, load_data
from threefactor.run.evaluate import evaluate

TINY = [
    "data.n_train=16", "data.n_test=8", "data.timesteps=12", "rule.burn_in=2",
    "train.epochs=1", "train.batch_size=8", "train.eval_batch_size=8", "train.progress=false",
    "network.layers.0.channels=4", "network.layers.1.channels=4", "network.layers.2.channels=4",
    "device=cpu",
]


def _sets(overrides) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _start(*args: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "threefactor", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The subprocess runs of this module, started together (each pays for importing torch)."""
    root = tmp_path_factory.mktemp("cli")
    out = root / "tiny"
    procs = {
        "unknown_key": _start("train", "--set", "optim.lrr=1"),
        "missing_config": _start("train", "--config", str(root / "missing.yaml")),
        "tiny": _start("train", *_sets(TINY), "--out", str(out)),
    }
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    results["tiny_out"] = out
    return results


def _assert_one_line_error(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("threefactor: error:"), stderr
    return lines[0]


# --- errors: exit code 2, one line, no traceback -------------------------------------------


def test_unknown_key_exits_2_with_one_line(runs):
    r = runs["unknown_key"]
    assert r.returncode == 2
    line = _assert_one_line_error(r.stderr)
    assert "'optim.lrr'" in line and "did you mean 'lr'" in line
    assert r.stdout == ""


def test_missing_config_file_exits_2_with_one_line(runs):
    r = runs["missing_config"]
    assert r.returncode == 2
    assert "missing.yaml" in _assert_one_line_error(r.stderr)


def test_unwritable_run_directory_fails_before_any_training(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory\n")
    rc = main(["train", *_sets(TINY), "--out", str(blocker / "run")])
    assert rc == 2
    captured = capsys.readouterr()
    line = _assert_one_line_error(captured.err)
    assert str(blocker / "run") in line
    assert "data:" not in captured.out and "epoch" not in captured.out  # nothing loaded or trained
    assert blocker.read_text() == "not a directory\n"


@pytest.mark.parametrize(
    "override",
    [
        "network.layers.0.type=dense",  # a dense layer cannot pool (the default pool is 2)
        "network.layers.2.pool=16",  # pooling leaves nothing of an 8 x 8 map
        "optim.lr_decay_factor=0",  # 1 / 0 for the scheduler
        "optim.betas=[0.0, 1.5]",  # rejected by torch.optim
    ],
)
def test_config_that_cannot_build_a_run_is_a_one_line_error(tmp_path, capsys, override):
    rc = main(["train", *_sets(TINY), "--set", "network.init=default", "--set", override,
               "--out", str(tmp_path / "run")])
    assert rc == 2
    _assert_one_line_error(capsys.readouterr().err)


def test_bad_type_in_set_is_one_line(capsys):
    assert main(["train", "--set", "train.epochs=1.5"]) == 2
    assert "'train.epochs'" in _assert_one_line_error(capsys.readouterr().err)


def test_print_config_applies_seed_device_and_set(capsys):
    assert main(["train", "--print-config", "--seed", "5", "--device", "cpu", "--set", "optim.lr=0.25"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = load_config(None, ["optim.lr=0.25", "device=cpu", "seed=5"])
    assert printed == yaml.safe_load(dump_config(expected))
    assert (printed["seed"], printed["device"], printed["optim"]["lr"]) == (5, "cpu", 0.25)


# --- a real (tiny) run --------------------------------------------------------------------


@pytest.fixture
def tiny_run(runs):
    r = runs["tiny"]
    assert r.returncode == 0, r.stderr
    return runs["tiny_out"], r


def test_run_directory_has_config_metrics_checkpoint_summary(tiny_run):
    out, r = tiny_run
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "metrics.jsonl", "checkpoint.pt", "summary.json"}
    assert not list(out.glob("*.tmp"))
    assert "Traceback" not in r.stderr
    # config.yaml is the resolved config
    assert load_config(out / "config.yaml") == load_config(None, TINY)


def test_metrics_rows_per_epoch_split_and_layer(tiny_run):
    out, _ = tiny_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6  # 1 epoch x {train, test} x 3 layers
    assert {(r["epoch"], r["split"], r["layer"]) for r in rows} == {
        (1, s, l) for s in ("train", "test") for l in (1, 2, 3)
    }
    for r in rows:
        assert {"epoch", "split", "layer", "accuracy", "loss"} <= r.keys()
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["loss"] >= 0 and r["loss"] == r["loss"]  # finite, not NaN
        # accuracies are fractions of whole samples (16 train, 8 test)
        n = 16 if r["split"] == "train" else 8
        assert abs(r["accuracy"] * n - round(r["accuracy"] * n)) < 1e-6


def test_summary_has_per_layer_test_accuracy_matching_metrics(tiny_run):
    out, _ = tiny_run
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    test_rows = {r["layer"]: r for r in rows if r["split"] == "test"}
    assert set(summary["test_accuracy"]) == {"layer1", "layer2", "layer3"}
    for i in (1, 2, 3):
        assert summary["test_accuracy"][f"layer{i}"] == test_rows[i]["accuracy"]
    assert summary["last_layer_test_accuracy"] == test_rows[3]["accuracy"]
    assert summary["epochs"] == 1


def test_checkpoint_loads_with_weights_only_and_reproduces_the_test_results(tiny_run):
    out, _ = tiny_run
    payload = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    network, cfg, raw = load_checkpoint(out / "checkpoint.pt")
    assert cfg == load_config(None, TINY)
    assert raw["epoch"] == 1
    state = network.state_dict()
    assert state.keys() == payload["model"].keys()
    assert all(torch.equal(state[k], payload["model"][k]) for k in state)
    # the loaded network is the trained one: it reproduces the run's test numbers exactly
    _, test = load_data(cfg)
    accs, losses, _ = evaluate(network, FrameBatches(test, cfg.train.eval_batch_size, shuffle=False),
                               resolve_loss(cfg.rule.loss), cfg.rule.burn_in)
    summary = json.loads((out / "summary.json").read_text())
    assert accs == [summary["test_accuracy"][f"layer{i}"] for i in (1, 2, 3)]
    assert losses == pytest.approx([summary["test_loss"][f"layer{i}"] for i in (1, 2, 3)], rel=1e-5)
    # a directory works as well as the file
    again, _, _ = load_checkpoint(out)
    assert all(torch.equal(again.state_dict()[k], state[k]) for k in state)


def test_version_names_the_package_and_torch(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"threefactor {version('threefactor')} (torch {version('torch')})"
