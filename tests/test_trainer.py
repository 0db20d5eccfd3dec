"""The trainer as a library: any iterable of ``(frames, labels)`` batches (a DataLoader over the
user's own Dataset, Tonic's transforms included) gets every feature of a run."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from threefactor import DecolleRule, Observer, RunError, Trainer, build_network, load_config, read_checkpoint
from threefactor.data import MotionDataset
from threefactor.data.synthetic.motion import MotionSpec
from threefactor.run.checkpoint import load_checkpoint

SPEC = MotionSpec(timesteps=16)
NETWORK = load_config(None, ["network.layers.0.channels=4", "network.layers.1.channels=4",
                             "network.layers.2.channels=4", "network.dropout=0.25"]).network


class OwnDataset(Dataset):
    """A user's own Dataset: frames as float tensors, labels as ints."""

    def __init__(self, split: str, n: int) -> None:
        self.inner = MotionDataset(split, n=n, spec=SPEC)

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        frames, label = self.inner[i]
        return torch.as_tensor(frames, dtype=torch.float32), label


def _trainer(out, observers=(), epochs: int = 2, **kwargs) -> Trainer:
    torch.manual_seed(0)
    net = build_network(NETWORK, (2, 32, 32), 8, seed=0)
    opt = torch.optim.Adamax(net.parameters(), lr=1e-3, betas=(0.0, 0.95))
    rule = DecolleRule(net, opt, burn_in=2)
    return Trainer(net, rule, opt, out, epochs=epochs, progress=False, log=lambda m: None,
                   observers=observers, checkpoint_every=1, **kwargs)


def _loaders(n_train: int = 16, n_test: int = 8):
    return (DataLoader(OwnDataset("train", n_train), batch_size=4, shuffle=True),
            DataLoader(OwnDataset("test", n_test), batch_size=8))


def _rows(run) -> list[dict]:
    """metrics.jsonl without its wall-clock times."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


class Recorder(Observer):
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def on_start(self, run) -> None:
        self.calls.append(("start", run.batches_done, run.resumed))

    def on_batch(self, m) -> None:
        self.calls.append(("batch", m.epoch, m.batch, m.batches_done, len(m.loss), len(m.firing_rate)))

    def on_evaluation(self, m) -> None:
        self.calls.append(("evaluation", m.epoch, m.split, len(m.accuracy)))

    def on_epoch(self, epoch, batches_done, network) -> None:
        self.calls.append(("epoch", epoch, batches_done))

    def on_checkpoint(self, batches_done) -> None:
        self.calls.append(("checkpoint", batches_done))

    def on_end(self, summary, network) -> None:
        self.calls.append(("end", summary["batches"]))

    def close(self) -> None:
        self.calls.append(("close",))


class Crash(Exception):
    pass


class CrashAt(Observer):
    def __init__(self, batches_done: int) -> None:
        self.at = batches_done

    def on_batch(self, m) -> None:
        if m.batches_done == self.at:
            raise Crash


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer") / "run"
    recorder = Recorder()
    summary = _trainer(out, [recorder]).fit(*_loaders())
    return out, summary, recorder


def test_a_dataloader_run_writes_the_run_directory_of_threefactor_train(finished):
    out, summary, _ = finished
    assert {"config.yaml", "metrics.jsonl", "checkpoint.pt", "summary.json"} <= {p.name for p in out.iterdir()}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["split"], r["layer"]) for r in rows] == [
        (e, s, layer) for e in (1, 2) for s in ("train", "test") for layer in (1, 2, 3)]
    assert summary["batches"] == 8 and summary["samples_seen"] == 32
    assert json.loads((out / "summary.json").read_text())["test_accuracy"] == summary["test_accuracy"]
    assert "a run of threefactor.Trainer built in Python" in (out / "config.yaml").read_text()
    assert read_checkpoint(out)["input_shape"] == [2, 32, 32]


def test_observers_hear_every_batch_evaluation_epoch_and_checkpoint_in_order(finished):
    calls = finished[2].calls
    epoch1 = [
        ("batch", 1, 1, 1, 3, 3), ("checkpoint", 1), ("batch", 1, 2, 2, 3, 3), ("checkpoint", 2),
        ("batch", 1, 3, 3, 3, 3), ("checkpoint", 3), ("batch", 1, 4, 4, 3, 3),
        ("evaluation", 1, "train", 3), ("evaluation", 1, "test", 3), ("epoch", 1, 4), ("checkpoint", 4)]
    assert calls[:2] == [("start", 0, False), ("checkpoint", 0)]
    assert calls[2:2 + len(epoch1)] == epoch1
    assert calls[-2:] == [("end", 8), ("close",)]


def test_a_killed_dataloader_run_resumes_to_the_same_weights(finished, tmp_path):
    """Shuffled DataLoader, dropout: the data order comes from the epoch's seed and the random
    streams from the checkpoint, so a crash in epoch 2 and a resume end where the whole run did."""
    out = tmp_path / "run"
    with pytest.raises(Crash):
        _trainer(out, [CrashAt(7)]).fit(*_loaders())
    assert read_checkpoint(out)["progress"]["batches_total"] == 6  # batch 7's checkpoint never came
    recorder = Recorder()
    summary = _trainer(out, [recorder]).fit(*_loaders(), resume=True)
    assert recorder.calls[0] == ("start", 6, True) and summary["resumes"] == 1
    done, again = read_checkpoint(finished[0]), read_checkpoint(out)
    for key, value in done["model"].items():
        assert torch.equal(value, again["model"][key]), key
    assert _rows(out) == _rows(finished[0])  # rows written after the checkpoint came again, once
    assert summary["test_accuracy"] == finished[1]["test_accuracy"]


def test_a_run_without_test_batches_reports_no_test_figures(tmp_path):
    train, _ = _loaders(8)
    summary = _trainer(tmp_path / "run", epochs=1).fit(train)
    assert summary["test_accuracy"] is None and summary["last_layer_test_accuracy"] is None
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in rows} == {"train"}


def test_a_run_built_in_python_is_refused_by_load_checkpoint_in_one_sentence(finished):
    with pytest.raises(RunError, match="this run was not built from a config .*load read_checkpoint"):
        load_checkpoint(finished[0])


class Batches:
    """An iterable of hand-made batches."""

    def __init__(self, *batches) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def _x(n: int = 2, shape=(16, 2, 32, 32)) -> torch.Tensor:
    return torch.zeros(n, *shape)


@pytest.mark.parametrize("batches, message", [
    (Batches((_x(), torch.tensor([0, 1])), (_x().fill_(float("nan")), torch.tensor([0, 1]))),
     "epoch 1, batch 2: the frames hold NaN or Inf"),
    (Batches((_x(), torch.tensor([0, 8]))), r"epoch 1, batch 1: label 8 is not one of the network's 8 classes \(0 to 7\)"),
    (Batches((_x(), torch.tensor([-1, 0]))), "epoch 1, batch 1: label -1 is not one of the network's 8 classes"),
    (Batches((_x(), torch.tensor([0.0, 1.0]))), "epoch 1, batch 1: labels must be 2 class indices"),
    (Batches((_x(), torch.tensor([0, 1, 2]))), "epoch 1, batch 1: labels must be 2 class indices"),
    (Batches((_x(), torch.tensor([0, 1])), (_x(shape=(16, 2, 16, 16)), torch.tensor([0, 1]))),
     r"epoch 1, batch 2: frames of shape \[2, 16, 16\] per step, but the run's are \[2, 32, 32\]"),
    (Batches((_x(shape=(16, 2, 16, 16)), torch.tensor([0, 1]))),
     r"epoch 1, batch 1: the network cannot take frames of shape \[2, 16, 16\]"),
    (Batches(_x()), "epoch 1, batch 1: a batch must be \\(frames, labels\\), got Tensor"),
    (Batches((torch.zeros(2, 5), torch.tensor([0, 1]))), r"frames must be \(batch, time, \.\.\.\), got shape \[2, 5\]"),
    (Batches(), "the training batches are empty"),
])
def test_bad_batches_are_refused_in_one_sentence_naming_the_batch(tmp_path, batches, message):
    with pytest.raises(RunError) as caught:
        _trainer(tmp_path / "run", epochs=1).fit(batches)
    assert re.search(message, str(caught.value)), str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.oracle
def test_tonic_transforms_feed_the_trainer(tmp_path):
    """Tonic's own ToFrame over the events of a Dataset, through a DataLoader."""
    tonic = pytest.importorskip("tonic", reason="Tonic is installed by ./dev test from tests/oracles.txt")

    class TonicFrames(Dataset):
        def __init__(self, split: str, n: int) -> None:
            self.inner = MotionDataset(split, n=n, spec=SPEC)
            self.to_frame = tonic.transforms.ToFrame(sensor_size=(32, 32, 2), n_time_bins=16)

        def __len__(self) -> int:
            return len(self.inner)

        def __getitem__(self, i: int):
            return self.to_frame(self.inner.events(i)).astype(np.float32), int(self.inner.targets[i])

    data = TonicFrames("train", 8)
    assert data[0][0].shape == (16, 2, 32, 32)
    summary = _trainer(tmp_path / "run", epochs=1).fit(DataLoader(data, 4, shuffle=True),
                                                      DataLoader(TonicFrames("test", 4), 4))
    assert summary["batches"] == 2 and len(summary["test_accuracy"]) == 3
