"""Results people look at: the run's PNGs, `threefactor plot`, TensorBoard event files."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from threefactor.cli import main
from threefactor.config import load_config
from threefactor.report.plots import PLOT_FILES, plot_filters, read_metrics, record_states
from threefactor.run.from_config import train

TINY = [
    "data.n_train=16", "data.n_test=8", "data.timesteps=16", "rule.burn_in=2",
    "train.epochs=2", "train.batch_size=4", "train.eval_batch_size=8", "train.progress=false",
    "network.layers.0.channels=4", "network.layers.1.channels=4", "network.layers.2.channels=4",
    "device=cpu", "train.eval_every=2", "train.tensorboard=true", "train.plots=true",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("plots") / "run"
    torch.manual_seed(0)
    logs: list[str] = []
    train(load_config(None, TINY), out, log=logs.append)
    return out, logs


def _image(path):
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return imread(path)


def _assert_non_trivial(path, min_side=300):
    img = _image(path)
    assert min(img.shape[:2]) >= min_side, (path, img.shape)
    rgb = (img[::3, ::3, :3] * 255).round().astype("int64").reshape(-1, 3)
    assert rgb.std() > 8, path  # not a blank canvas
    colours = rgb[:, 0] * 65536 + rgb[:, 1] * 256 + rgb[:, 2]
    assert len(set(colours.tolist())) > 50, path  # real content, not a few flat areas


def test_training_draws_every_plot_into_the_run_directory(run):
    out, logs = run
    for name in PLOT_FILES:
        _assert_non_trivial(out / "plots" / name)
    assert not list((out / "plots").glob("*.tmp"))
    assert any(line.startswith("plots:") for line in logs)


def test_metrics_rows_carry_the_training_position_for_the_error_curves(run):
    out, _ = run
    rows = read_metrics(out / "metrics.jsonl")
    test = [r for r in rows if r["split"] == "test" and r["layer"] == 1]
    # eval_every = 2 batches: after batch 2 and at the end of each of the 2 epochs of 4 batches
    assert [(r["epoch"], r["batch"], r["samples"]) for r in test] == [(1, 2, 8), (1, 4, 16), (2, 2, 24), (2, 4, 32)]
    assert all(0.0 <= r["firing_rate"] <= 1.0 for r in rows)


def test_plot_command_redraws_a_finished_run(run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run[0], copy)
    shutil.rmtree(copy / "plots")
    assert main(["plot", str(copy)]) == 0
    assert "wrote" in capsys.readouterr().out
    for name in PLOT_FILES:
        _assert_non_trivial(copy / "plots" / name)


def test_plot_command_works_on_a_run_still_writing(run, tmp_path):
    copy = tmp_path / "running"
    shutil.copytree(run[0], copy)
    shutil.rmtree(copy / "plots")
    (copy / "summary.json").unlink()
    with open(copy / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "split": "tra')  # a row being written right now
    assert main(["plot", str(copy)]) == 0
    assert (copy / "plots" / "error_curves.png").exists()


def test_plot_command_on_something_that_is_not_a_run_is_one_line(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("threefactor: error:") and len(err.splitlines()) == 1
    assert main(["plot", str(tmp_path)]) == 2  # a directory without a checkpoint
    assert "no checkpoint" in capsys.readouterr().err


def test_tensorboard_has_per_layer_loss_accuracy_rates_and_weight_histograms(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = run
    files = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert files
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    scalars, hists = set(acc.Tags()["scalars"]), set(acc.Tags()["histograms"])
    for layer in (1, 2, 3):
        assert {f"batch_loss/layer{layer}", f"batch_firing_rate/layer{layer}",
                f"train/accuracy/layer{layer}", f"test/accuracy/layer{layer}", f"test/loss/layer{layer}",
                f"test/firing_rate/layer{layer}"} <= scalars
        assert {f"layer{layer}/weight", f"layer{layer}/bias"} <= hists
    assert [e.step for e in acc.Scalars("batch_loss/layer1")] == list(range(1, 9))
    assert [e.step for e in acc.Scalars("test/accuracy/layer3")] == [2, 4, 6, 8]
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "test" and r["layer"] == 3]
    assert [e.value for e in acc.Scalars("test/accuracy/layer3")] == pytest.approx([r["accuracy"] for r in rows])


def test_tensorboard_and_plots_can_be_switched_off(tmp_path):
    out = tmp_path / "quiet"
    cfg = load_config(None, [*TINY, "train.epochs=1", "train.tensorboard=false", "train.plots=false"])
    train(cfg, out, log=lambda s: None)
    assert not (out / "tensorboard").exists() and not (out / "plots").exists()
    assert json.loads((out / "summary.json").read_text())["epochs"] == 1


def test_filters_of_a_dense_first_layer_and_neuron_states(tmp_path):
    from threefactor.demos import build_regression_network

    net = build_regression_network(n_inputs=20, hidden=16, layers=3, seed=0)
    _assert_non_trivial(plot_filters(net, (20,), tmp_path / "dense.png"), min_side=200)
    x = (torch.rand(50, 20) < 0.3).float()
    recs = record_states(net, x, n_neurons=3, n_inputs=2)
    assert len(recs) == 3
    for rec in recs:
        assert rec["u"].shape == rec["s"].shape == rec["r"].shape == (50, 3)
        assert rec["p"].shape == rec["inputs"].shape == (50, 2) and rec["y"].shape == (50, 1)
        assert len(set(rec["neurons"])) == 3


def test_inputs_that_are_not_images_are_drawn_as_a_raster(tmp_path):
    from threefactor.report.plots import plot_input_events

    frames = (torch.rand(40, 1, 1, 70) < 0.1).to(torch.uint8)  # SHD-like: channels, no image
    _assert_non_trivial(plot_input_events(frames, 1, ["a", "b"], tmp_path / "raster.png"), min_side=300)
