"""Data-parallel training under torchrun: 2 processes, gloo on 127.0.0.1, against 1 process.

Every launch is a real ``python -m torch.distributed.run`` of ``threefactor train`` (or of a
small script that calls ``train``). Dropout is 0 here: each process draws its own dropout masks
(on purpose, from its own seed), so with dropout the runs agree in distribution, not weight by
weight.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from stall_point import stall_args, wait_for_marker
from threefactor.config import load_config
from threefactor.run.collective import shard
from threefactor.run.checkpoint import read_checkpoint

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import _harness as H  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="this PyTorch has no torch.distributed with the gloo backend",
)

# 16 samples in global batches of 5: 5, 5, 5, 1. Two processes split them 3 + 2 (uneven shares)
# and 1 + 0 (process 1 has no sample in the last batch). One epoch, a checkpoint every batch.
TINY = [
    "data.n_train=16", "data.n_test=8", "data.timesteps=12", "rule.burn_in=2",
    "train.epochs=1", "train.batch_size=5", "train.eval_batch_size=8", "train.progress=false",
    "network.layers.0.channels=4", "network.layers.1.channels=4", "network.layers.2.channels=4",
    "network.dropout=0", "device=cpu", "train.checkpoint_every=1", "train.plots=false",
    "train.tensorboard=false",
]
RUN_FILES = {"config.yaml", "metrics.jsonl", "checkpoint.pt", "summary.json"}
ATOL = 1e-5


def _sets(overrides) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if "GLOO_SOCKET_IFNAME" not in env and Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo on the loopback, whatever the host name resolves to
    return env


def _launch(nproc: int, target: list[str], **env) -> subprocess.Popen:
    """``target`` (``-m threefactor ...`` or a script and its arguments) on ``nproc`` processes:
    torchrun with gloo on 127.0.0.1 for 2 or more, a plain interpreter for 1."""
    return subprocess.Popen(H.launch_command(nproc, target), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(**env))


def _train(nproc: int, args: list[str], stall: list[str] = (), **env) -> subprocess.Popen:
    """``threefactor train ARGS`` on ``nproc`` processes; ``stall``: ``stall_point.stall_args``."""
    return _launch(nproc, [*stall, "train", *args] if stall else ["-m", "threefactor", "train", *args], **env)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{proc.args}\n{out}\n{err}"
    return out


def _stop_when_stalled(proc: subprocess.Popen, marker: Path, timeout: float = 120.0) -> None:
    """Wait until the trainer reached the stall point, then stop it (torchrun: SIGTERM, which
    it passes on to its workers; one process: SIGKILL)."""
    wait_for_marker(proc, marker, timeout)
    is_torchrun = "torch.distributed.run" in proc.args
    proc.send_signal(signal.SIGTERM if is_torchrun else signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode != 0


def _assert_same_weights(a: Path, b: Path) -> None:
    ma, mb = read_checkpoint(a)["model"], read_checkpoint(b)["model"]
    assert ma.keys() == mb.keys()
    for key in ma:
        assert torch.allclose(ma[key], mb[key], rtol=0, atol=ATOL), (
            key, (ma[key] - mb[key]).abs().max().item())


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny run on one process and on two."""
    root = tmp_path_factory.mktemp("dist")
    d = {k: root / k for k in ("one", "two")}
    procs = {k: _train(n, [*_sets(TINY), "--out", str(d[k])]) for k, n in (("one", 1), ("two", 2))}
    return {"dirs": d, "stdout": {k: _finish(p) for k, p in procs.items()}}


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """Runs stopped in the middle of the epoch, resumed with the other number of processes."""
    root = tmp_path_factory.mktemp("resume")
    d = {k: root / k for k in ("two_then_one", "one_then_two")}
    m2, m1 = root / "stalled2", root / "stalled1"
    # Stalled just before the checkpoint of batch 3: the checkpoint holds batch 2 of 4.
    stall2 = _train(2, [*_sets(TINY), "--out", str(d["two_then_one"])], stall_args("batch", 3, m2))
    stall1 = _train(1, [*_sets(TINY), "--out", str(d["one_then_two"])], stall_args("batch", 3, m1))
    _stop_when_stalled(stall2, m2)
    _stop_when_stalled(stall1, m1)
    stopped = {k: read_checkpoint(d[k])["progress"] for k in d}
    procs = {"two_then_one": _train(1, ["--resume", str(d["two_then_one"])]),
             "one_then_two": _train(2, ["--resume", str(d["one_then_two"])])}
    for proc in procs.values():
        _finish(proc)
    return {"dirs": d, "stopped": stopped}


def test_two_processes_end_with_the_weights_of_one_process_on_the_combined_batch(runs):
    d = runs["dirs"]
    _assert_same_weights(d["one"], d["two"])
    a, b = read_checkpoint(d["one"]), read_checkpoint(d["two"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in sa:
            assert torch.allclose(sa[k], sb[k], rtol=0, atol=ATOL), k
    assert b["progress"]["batches_total"] == a["progress"]["batches_total"] == 4
    assert b["progress"]["samples"] == 16  # samples of all processes together


def test_metrics_of_two_processes_are_those_of_all_samples(runs):
    d = runs["dirs"]
    one, two = _rows(d["one"]), _rows(d["two"])
    assert len(one) == len(two) == 6  # {train, test} x 3 layers
    for r1, r2 in zip(one, two):
        assert (r1["epoch"], r1["split"], r1["layer"], r1["samples"]) == (r2["epoch"], r2["split"], r2["layer"], r2["samples"])
        assert r1["accuracy"] == r2["accuracy"]  # vote counts, added over the processes
        assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-5)
        assert r1["firing_rate"] == pytest.approx(r2["firing_rate"], rel=1e-5)
    summary = json.loads((d["two"] / "summary.json").read_text())
    assert summary["distributed"]["processes"] == 2 and summary["distributed"]["sync"] == "exact"


def test_only_process_zero_logs_and_writes(runs):
    d = runs["dirs"]
    assert {p.name for p in d["two"].iterdir()} == RUN_FILES
    stdout = runs["stdout"]["two"]
    assert stdout.count("run directory:") == 1 and stdout.count("done in") == 1
    assert stdout.count("epoch 1:") == 1


def test_a_two_process_checkpoint_resumes_on_one_process(runs, resumed):
    d = resumed["dirs"]
    p = resumed["stopped"]["two_then_one"]
    assert (p["epoch_done"], p["batch"], p["batches_total"], p["samples"]) == (0, 2, 2, 10)
    assert len(p["rank_rng"]) == 2  # each process's random state
    _assert_same_weights(runs["dirs"]["one"], d["two_then_one"])
    assert len(_rows(d["two_then_one"])) == 6
    assert json.loads((d["two_then_one"] / "summary.json").read_text())["resumes"] == 1


def test_a_one_process_checkpoint_resumes_on_two_processes(runs, resumed):
    d = resumed["dirs"]
    p = resumed["stopped"]["one_then_two"]
    assert (p["epoch_done"], p["batch"], p["batches_total"]) == (0, 2, 2)
    _assert_same_weights(runs["dirs"]["one"], d["one_then_two"])
    summary = json.loads((d["one_then_two"] / "summary.json").read_text())
    assert summary["resumes"] == 1 and summary["batches"] == 4 and summary["samples_seen"] == 16
    assert "distributed" in summary


OTHER_RULES = {"stllr": ["rule.name=stllr", "network.neuron_model=lif"], "bptt": ["rule.name=bptt"]}


@pytest.fixture(scope="module")
def other_rules(tmp_path_factory):
    """S-TLLR and BPTT on one process and on two (exact mode)."""
    root = tmp_path_factory.mktemp("rules")
    procs = {(rule, n): _train(n, [*_sets([*TINY, *extra]), "--out", str(root / f"{rule}{n}")])
             for rule, extra in OTHER_RULES.items() for n in (1, 2)}
    for proc in procs.values():
        _finish(proc)
    return root


@pytest.mark.parametrize("rule", sorted(OTHER_RULES))
def test_stllr_and_bptt_on_two_processes_match_one_process(other_rules, rule):
    _assert_same_weights(other_rules / f"{rule}1", other_rules / f"{rule}2")


# --- train() called by a script under torchrun: what each process holds --------------------------

# Each process trains into its own directory (process 0 alone may write one) and, after train()
# returns, the script saves the weights of the network that train() built in that process.
SCRIPT = r'''
import json, os, sys
import torch
import importlib
T = importlib.import_module("threefactor.run.from_config")
from threefactor.config import load_config

built = []
_build = T.build_network
def capture(*args, **kwargs):
    built.append(_build(*args, **kwargs))
    return built[-1]
T.build_network = capture
rank = int(os.environ["RANK"])
root = sys.argv[2]
summary = T.train(load_config(None, json.loads(sys.argv[1])), os.path.join(root, f"run{rank}"))
torch.save(built[0].state_dict(), os.path.join(root, f"weights{rank}.pt"))
with open(os.path.join(root, f"summary{rank}.json"), "w") as f:
    json.dump(summary, f)
'''

# The exact synchroniser alone, with SGD (lr 1) and gradients set by hand: parameter a has a
# gradient on both processes, b on process 0 only, c on neither; weights (batch shares) 3 and 1.
UNIT = r'''
import os, sys
import torch
from threefactor.run.collective import Synchroniser, init_from_env, teardown

info, _ = init_from_env(torch.device("cpu"))
a, b, c = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
opt = torch.optim.SGD([a, b, c], lr=1.0)
sync = Synchroniser(opt, info, "exact")
sync.weight = 3 if info.rank == 0 else 1
a.grad = torch.full((3,), 1.0 + info.rank)  # 1 on process 0, 2 on process 1
b.grad = torch.full((3,), 4.0) if info.rank == 0 else None
opt.step()
grad_b, grad_c = b.grad, c.grad
torch.save({"a": a.detach(), "b": b.detach(), "c": c.detach(), "c_grad_none": grad_c is None,
            "stats": sync.stats()}, os.path.join(sys.argv[1], f"unit{info.rank}.pt"))
teardown()
'''


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    """The same tiny run on 2 processes in exact mode and in periodic mode (K beyond the run)."""
    root = tmp_path_factory.mktemp("scripted")
    script, unit = root / "train_script.py", root / "unit_script.py"
    script.write_text(SCRIPT)
    unit.write_text(UNIT)
    modes = {"exact": ["distributed.sync=exact"],
             "periodic": ["distributed.sync=periodic", "distributed.average_every=1000"]}
    procs = {}
    for mode, extra in modes.items():
        (root / mode).mkdir()
        procs[mode] = _launch(2, [str(script), json.dumps([*TINY, *extra]), str(root / mode)])
    (root / "unit").mkdir()
    procs["unit"] = _launch(2, [str(unit), str(root / "unit")])
    for proc in procs.values():
        _finish(proc)
    return root


def test_only_process_zero_writes_a_run_directory(scripted):
    for mode in ("exact", "periodic"):
        assert {p.name for p in (scripted / mode / "run0").iterdir()} == RUN_FILES
        assert not (scripted / mode / "run1").exists()


@pytest.mark.parametrize("mode", ["exact", "periodic"])
def test_every_process_ends_with_the_same_weights_as_the_checkpoint(scripted, mode):
    w0 = torch.load(scripted / mode / "weights0.pt", weights_only=True)
    w1 = torch.load(scripted / mode / "weights1.pt", weights_only=True)
    saved = read_checkpoint(scripted / mode / "run0")["model"]
    for key in w0:
        assert torch.equal(w0[key], w1[key]), key
        assert torch.equal(w0[key], saved[key]), key


def test_periodic_averaging_exchanges_far_less_than_exact(scripted):
    exact = json.loads((scripted / "exact" / "summary0.json").read_text())["distributed"]
    periodic = json.loads((scripted / "periodic" / "summary0.json").read_text())["distributed"]
    assert exact["optimizer_steps"] == periodic["optimizer_steps"] == 4 * 10  # 4 batches x 10 steps
    assert exact["collectives"] == exact["optimizer_steps"]  # one flat all-reduce per step
    # periodic with K beyond the run: weights averaged only where one model is needed (an
    # evaluation or checkpoint after some steps): at most once per batch here.
    assert 1 <= periodic["collectives"] <= 4
    assert periodic["communicated_mb"] < exact["communicated_mb"] / 5
    modes_differ = any(
        not torch.equal(a, b) for a, b in zip(
            read_checkpoint(scripted / "exact" / "run0")["model"].values(),
            read_checkpoint(scripted / "periodic" / "run0")["model"].values()))
    assert modes_differ  # local steps between averages: not the trajectory of exact mode


def test_exact_mode_averages_gradients_by_batch_share_and_keeps_absent_ones_absent(scripted):
    for rank in (0, 1):
        r = torch.load(scripted / "unit" / f"unit{rank}.pt", weights_only=True)
        assert torch.allclose(r["a"], torch.full((3,), -(3 * 1.0 + 1 * 2.0) / 4))
        assert torch.allclose(r["b"], torch.full((3,), -(3 * 4.0) / 4))  # zero where absent
        assert torch.equal(r["c"], torch.zeros(3)) and r["c_grad_none"]  # absent everywhere
        assert r["stats"]["collectives"] == 1 and r["stats"]["optimizer_steps"] == 1


# --- in one process -------------------------------------------------------------------------------


@pytest.mark.parametrize("n,world", [(16, 2), (5, 2), (1, 2), (7, 3), (2, 4)])
def test_shards_are_contiguous_cover_the_batch_and_differ_by_at_most_one(n, world):
    bounds = [shard(n, r, world) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(bounds[r][1] == bounds[r + 1][0] for r in range(world - 1))
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_distributed_settings_are_checked_in_one_sentence():
    from threefactor.config import ConfigError

    with pytest.raises(ConfigError, match=r"'distributed.sync' must be one of 'exact', 'periodic'"):
        load_config(None, ["distributed.sync=always"])
    with pytest.raises(ConfigError, match=r"'distributed.average_every' must be >= 1"):
        load_config(None, ["distributed.average_every=0"])
    with pytest.raises(ConfigError, match=r"did you mean 'average_every'"):
        load_config(None, ["distributed.average_evry=5"])


def test_a_checkpoint_from_before_the_distributed_settings_still_resumes(tmp_path):
    """Keys newer than a checkpoint's config count as their defaults on --resume."""
    import yaml

    from threefactor.config import dump_config
    from threefactor.errors import RunError
    from threefactor.run.from_config import check_resume_config

    cfg = load_config(None, TINY)
    old = yaml.safe_load(dump_config(cfg))
    del old["distributed"]
    check_resume_config(cfg, {"config": yaml.safe_dump(old)}, tmp_path)  # no error
    changed = load_config(None, [*TINY, "distributed.sync=periodic"])
    with pytest.raises(RunError, match="distributed.sync"):
        check_resume_config(changed, {"config": yaml.safe_dump(old)}, tmp_path)
