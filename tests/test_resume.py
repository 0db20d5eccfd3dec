"""Runs that survive: exact resume after SIGKILL, refused tampered checkpoints, divergence guard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import importlib

import pytest
import torch

from stall_point import stall_args, wait_for_marker
from threefactor.cli import main
from threefactor.config import load_config
from threefactor.errors import RunError
from threefactor.run.checkpoint import CHECKPOINT_FORMAT, _seal, load_checkpoint, read_checkpoint
from threefactor.run.from_config import train

train_module = importlib.import_module("threefactor.run.from_config")  # the package exports a function "train"

# 16 samples in batches of 4: 4 batches per epoch, 8 in all. Dropout draws from the global RNG,
# so an exact resume also needs the RNG state back.
TINY = [
    "data.n_train=16", "data.n_test=8", "data.timesteps=12", "rule.burn_in=2",
    "train.epochs=2", "train.batch_size=4", "train.eval_batch_size=8", "train.progress=false",
    "network.layers.0.channels=4", "network.layers.1.channels=4", "network.layers.2.channels=4",
    "network.dropout=0.25", "device=cpu", "train.checkpoint_every=1", "train.plots=false",
    "train.tensorboard=false",
]


def _sets(overrides) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _env(**extra) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)


def _start(args: list[str], stall: list[str] = (), **env) -> subprocess.Popen:
    """``threefactor ARGS`` in a new process; ``stall``: ``stall_point.stall_args``."""
    command = [sys.executable, *stall] if stall else [sys.executable, "-m", "threefactor"]
    return subprocess.Popen([*command, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(**env))


def _kill_when_stalled(proc: subprocess.Popen, marker: Path, timeout: float = 120.0) -> None:
    """Wait until the trainer says it reached the stall point, then SIGKILL it."""
    wait_for_marker(proc, marker, timeout)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    marker.unlink()


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _progress(run: Path) -> dict:
    return read_checkpoint(run)["progress"]


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """An uninterrupted run, and the same run killed twice and resumed twice."""
    root = tmp_path_factory.mktemp("resume")
    ref, run, marker = root / "reference", root / "killed", root / "stalled"
    reference = _start(["train", *_sets(TINY), "--out", str(ref)])
    # 1st kill: batch 4 ends epoch 1; its metrics rows are written but its checkpoint is not.
    first = _start(["train", *_sets(TINY), "--out", str(run)], stall_args("test", 4, marker))
    _kill_when_stalled(first, marker)
    after_first = {"progress": _progress(run), "rows": _rows(run)}
    # 2nd kill: in the middle of epoch 2 (batch 6 of 8; the checkpoint holds batch 5).
    second = _start(["train", "--resume", str(run)], stall_args("batch", 6, marker))
    _kill_when_stalled(second, marker)
    after_second = {"progress": _progress(run), "rows": _rows(run)}
    third = _start(["train", "--resume", str(run)])
    out3, err3 = third.communicate(timeout=300)
    out_ref, err_ref = reference.communicate(timeout=300)
    assert reference.returncode == 0, err_ref
    assert third.returncode == 0, err3
    return {"ref": ref, "run": run, "after_first": after_first, "after_second": after_second,
            "stdout": out3, "stderr": err3}


def test_kills_landed_where_intended(killed_and_resumed):
    p1 = killed_and_resumed["after_first"]["progress"]
    assert (p1["epoch_done"], p1["batch"], p1["batches_total"]) == (0, 3, 3)
    assert len(killed_and_resumed["after_first"]["rows"]) == 6  # epoch 1 rows, not checkpointed
    p2 = killed_and_resumed["after_second"]["progress"]
    assert (p2["epoch_done"], p2["batch"], p2["batches_total"]) == (1, 1, 5)  # mid-epoch


def test_resumed_run_has_bit_identical_weights_and_optimiser(killed_and_resumed):
    a = torch.load(killed_and_resumed["ref"] / "checkpoint.pt", weights_only=True)
    b = torch.load(killed_and_resumed["run"] / "checkpoint.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    assert a["scheduler"] == b["scheduler"]
    assert torch.equal(a["progress"]["rng"]["torch"], b["progress"]["rng"]["torch"])


def test_resumed_metrics_have_no_duplicated_or_missing_rows(killed_and_resumed):
    ref, run = _rows(killed_and_resumed["ref"]), _rows(killed_and_resumed["run"])
    keys = [(r["epoch"], r["split"], r["layer"]) for r in run]
    assert len(keys) == len(set(keys)) == 12  # 2 epochs x {train, test} x 3 layers
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time_s"} for r in rows]  # noqa: E731
    assert strip(run) == strip(ref)
    summary_ref = json.loads((killed_and_resumed["ref"] / "summary.json").read_text())
    summary = json.loads((killed_and_resumed["run"] / "summary.json").read_text())
    assert summary["test_accuracy"] == summary_ref["test_accuracy"]
    assert summary["resumes"] == 2 and summary["batches"] == 8
    assert "resuming" in killed_and_resumed["stdout"]
    assert not list(killed_and_resumed["run"].glob("*.tmp"))


# --- the command line around --resume ---------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished tiny run made in-process (1 epoch)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    torch.manual_seed(0)
    cfg = load_config(None, [*TINY, "train.epochs=1"])
    train(cfg, out, log=lambda s: None)
    return out


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("threefactor: error:"), err
    return lines[0]


@pytest.mark.parametrize("extra", [["--set", "optim.lr=0.1"], ["--config", "x.yaml"], ["--seed", "3"]])
def test_resume_refuses_config_changes_on_the_command_line(finished_run, capsys, extra):
    assert main(["train", "--resume", str(finished_run), *extra]) == 2
    line = _one_line_error(capsys)
    assert "--resume" in line and extra[0] in line and "config.yaml" in line


def test_resume_with_more_epochs_extends_a_finished_run(finished_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "longer"
    shutil.copytree(finished_run, run)
    assert main(["train", "--resume", str(run), "--set", "train.epochs=2", "--set", "train.plots=false"]) == 0
    capsys.readouterr()
    assert {row["epoch"] for row in _rows(run)} == {1, 2}
    assert _rows(run)[: len(_rows(finished_run))] == _rows(finished_run)  # epoch 1 kept as it was
    assert load_config(run / "config.yaml").train.epochs == 2  # the next --resume goes on from here
    assert main(["train", "--resume", str(run)]) == 0  # finished at 2 epochs: nothing more to do


def test_resume_of_a_directory_without_a_run_is_one_line(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "nothing" in _one_line_error(capsys)


def test_resume_refuses_a_config_yaml_that_changes_what_is_computed(finished_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    text = (run / "config.yaml").read_text().replace("lr: 0.001", "lr: 0.5")
    assert "lr: 0.5" in text
    (run / "config.yaml").write_text(text)
    assert main(["train", "--resume", str(run)]) == 2
    assert "'optim.lr'" in _one_line_error(capsys)


def test_a_new_run_does_not_overwrite_an_existing_one(finished_run, capsys):
    before = (finished_run / "checkpoint.pt").read_bytes()
    assert main(["train", *_sets(TINY), "--out", str(finished_run)]) == 2
    assert "--resume" in _one_line_error(capsys)
    assert (finished_run / "checkpoint.pt").read_bytes() == before


def test_resuming_a_finished_run_changes_nothing(finished_run, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    cfg = load_config(run / "config.yaml")
    summary = train(cfg, run, log=lambda s: None, resume=True)
    before = json.loads((finished_run / "summary.json").read_text())
    assert summary["test_accuracy"] == before["test_accuracy"]
    assert _rows(run) == _rows(finished_run)
    a, b = read_checkpoint(finished_run), read_checkpoint(run)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


# --- tampered checkpoints -------------------------------------------------------------------


def _copy_with(finished_run: Path, tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("where", [0.0, 0.1, 0.5, 0.9, -1])
def test_a_flipped_byte_is_refused_in_one_sentence(finished_run, tmp_path, where):
    data = bytearray((finished_run / "checkpoint.pt").read_bytes())
    pos = len(data) - 1 if where == -1 else int(where * len(data))
    data[pos] ^= 0x01
    path = _copy_with(finished_run, tmp_path, bytes(data))
    with pytest.raises(RunError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert "refused" in msg and "\n" not in msg


def test_every_single_byte_flip_in_the_tensor_data_is_caught(finished_run, tmp_path):
    data = (finished_run / "checkpoint.pt").read_bytes()
    path = tmp_path / "c.pt"
    for pos in range(0, len(data), max(1, len(data) // 300)):
        flipped = bytearray(data)
        flipped[pos] ^= 0x80
        path.write_bytes(bytes(flipped))
        with pytest.raises(RunError):
            read_checkpoint(path)


@pytest.mark.parametrize("keep", [0, 10, 0.5, -1])
def test_a_truncated_checkpoint_is_refused_in_one_sentence(finished_run, tmp_path, keep):
    data = (finished_run / "checkpoint.pt").read_bytes()
    n = len(data) - 1 if keep == -1 else int(keep * len(data)) if isinstance(keep, float) else keep
    path = _copy_with(finished_run, tmp_path, data[:n])
    with pytest.raises(RunError) as err:
        load_checkpoint(path)
    assert "truncated" in str(err.value)


def test_tampered_checkpoint_is_one_line_on_the_command_line(finished_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    data = bytearray((run / "checkpoint.pt").read_bytes())
    data[len(data) // 2] ^= 0x04
    (run / "checkpoint.pt").write_bytes(bytes(data))
    assert main(["train", "--resume", str(run)]) == 2
    assert "altered" in _one_line_error(capsys)
    (run / "checkpoint.pt").write_bytes(bytes(data[: len(data) // 3]))
    assert main(["plot", str(run)]) == 2
    assert "truncated" in _one_line_error(capsys)


class _NotPlainData:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_sealed_checkpoint_with_arbitrary_objects_is_never_unpickled(tmp_path, capsys):
    import io

    buf = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "version": 2, "evil": _NotPlainData()}, buf)
    path = tmp_path / "evil.pt"
    path.write_bytes(_seal(buf.getvalue()))  # a valid seal: only weights_only stands in the way
    with pytest.raises(RunError) as err:
        read_checkpoint(path)
    assert "objects other than tensors" in str(err.value)
    assert "this must never run" not in capsys.readouterr().out


# --- the divergence guard --------------------------------------------------------------------


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = load_config(None, [*TINY, "optim.lr=1e38"])
    with pytest.raises(RunError) as err:
        train(cfg, tmp_path / "run", log=lambda s: None)
    msg = str(err.value)
    assert "diverged" in msg and "last good checkpoint" in msg and "optim.lr" in msg
    network, _, payload = load_checkpoint(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in network.parameters())
    assert payload["progress"]["batches_total"] == 0


def test_an_injected_nan_stops_the_run_after_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    make_rule = train_module.make_rule

    def poisoned_rule(cfg, network, optimizer):
        rule = make_rule(cfg, network, optimizer)
        train_sequence = rule.train_sequence

        def poisoned(x, labels):
            res = train_sequence(x, labels)
            calls["n"] += 1
            if calls["n"] == 3:  # the 3rd batch leaves a NaN in layer 2's weights
                with torch.no_grad():
                    network.layers[1].synapse.weight.view(-1)[0] = float("nan")
            return res

        rule.train_sequence = poisoned
        return rule

    monkeypatch.setattr(train_module, "make_rule", poisoned_rule)
    cfg = load_config(None, TINY)
    with pytest.raises(RunError) as err:
        train(cfg, tmp_path / "run", log=lambda s: None)
    msg = str(err.value)
    assert "epoch 1, batch 3" in msg and "layer 2 weight holds NaN or Inf" in msg
    assert "from epoch 1, batch 2" in msg
    network, _, payload = load_checkpoint(tmp_path / "run")
    assert payload["progress"]["batches_total"] == 2
    assert all(torch.isfinite(p).all() for p in network.parameters())
    # and the run goes on from there (here without the poison)
    monkeypatch.undo()
    summary = train(cfg, tmp_path / "run", log=lambda s: None, resume=True)
    assert summary["batches"] == 8


def test_raising_train_epochs_continues_a_finished_run_exactly(finished_run, killed_and_resumed, tmp_path):
    """A 1-epoch run extended to 2 epochs ends where the 2-epoch reference run ends."""
    import shutil

    run = tmp_path / "extended"
    shutil.copytree(finished_run, run)
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("epochs: 1", "epochs: 2"))
    train(load_config(run / "config.yaml"), run, log=lambda s: None, resume=True)
    a, b = read_checkpoint(killed_and_resumed["ref"]), read_checkpoint(run)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert len(_rows(run)) == 12
