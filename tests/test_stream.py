"""Learning that never stops: sources of unbounded streams, the prequential learner, runs that
last (checkpoints, exact resume after kill -9, bounded files), and the continual measures."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from threefactor import DecolleRule, RunError, build_network, load_config, read_checkpoint
from threefactor.data.events import make_events
from threefactor.stream.learner import StreamLearner, read_rows
from threefactor.stream.measures import average_accuracy, forgetting, recovery_time
from threefactor.errors import EventFileError
from threefactor.stream.prefetch import SEGMENT_MMAP_THRESHOLD, Prefetch
from threefactor.stream.sources import (
    UNLABELLED, Aedat4Stream, LabelTimeline, MotionStream, RecordingStream, Scenario, Segment, Source,
)

from stall_point import wait_for_marker

SMALL = ["stream.steps=1500", "stream.window_steps=500", "train.progress=false", "train.plots=false",
         "device=cpu", "stream.min_ms=40", "stream.max_ms=80", "rule.compile=false"]


def _take(source, n: int) -> list[Segment]:
    return [next(source) for _ in range(n)]


# --- sources --------------------------------------------------------------------------------------


def test_a_motion_stream_is_deterministic_and_seeks_to_any_segment():
    a = _take(MotionStream(seed=3, min_ms=20, max_ms=50, downsample=2), 6)
    b = _take(MotionStream(seed=3, min_ms=20, max_ms=50, downsample=2), 6)
    assert all(torch.equal(x.frames, y.frames) and x.label == y.label for x, y in zip(a, b))
    assert [s.start_us for s in a] == list(np.cumsum([0] + [len(s.frames) * 1000 for s in a[:-1]]))
    assert all(20 <= len(s.frames) <= 50 and s.frames.shape[1:] == (2, 16, 16) for s in a)
    later = MotionStream(seed=3, min_ms=20, max_ms=50, downsample=2)
    later.seek(4, a[4].start_us)
    again = next(later)
    assert again.index == 4 and again.start_us == a[4].start_us and torch.equal(again.frames, a[4].frames)
    assert [s.label for s in _take(MotionStream(seed=4, min_ms=20, max_ms=50), 6)] != [s.label for s in a]


def test_scenarios_change_the_classes_the_labels_and_the_domain():
    phases = Scenario(phases=((0, (0, 1)), (5, (2, 3))))
    labels = [s.truth for s in _take(MotionStream(seed=0, min_ms=5, max_ms=5, scenario=phases), 12)]
    assert set(labels[:5]) <= {0, 1} and set(labels[5:]) <= {2, 3}
    sparse = _take(MotionStream(seed=0, min_ms=5, max_ms=5, scenario=Scenario(label_fraction=0.3)), 200)
    given = [s.label != UNLABELLED for s in sparse]
    assert 0.2 < np.mean(given) < 0.4 and all(s.truth != UNLABELLED for s in sparse)
    assert all(s.label == s.truth for s in sparse if s.label != UNLABELLED)
    plain = _take(MotionStream(seed=1, min_ms=30, max_ms=30), 20)
    fast = _take(MotionStream(seed=1, min_ms=30, max_ms=30, scenario=Scenario(shift_at=0, shift="speed")), 20)
    off_lost = _take(MotionStream(seed=1, min_ms=30, max_ms=30, scenario=Scenario(shift_at=0, shift="polarity")), 20)
    assert [s.truth for s in fast] == [s.truth for s in plain]
    events = lambda segs: torch.stack([s.frames.sum((0, 2, 3)) for s in segs]).sum(0)  # (OFF, ON) counts
    assert events(fast).sum() > 1.3 * events(plain).sum()  # twice the speed: more contrast crossings
    ratio_plain, ratio_shift = (e[0] / e[1] for e in (events(plain), events(off_lost)))
    assert 0.2 < ratio_shift / ratio_plain < 0.4  # 70 % of the OFF events dropped


class _Recordings:
    """An EventDataset stand-in: three recordings of different lengths."""

    classes = ("a", "b")
    sensor_size = (8, 8, 2)
    targets = np.array([0, 1, 0])
    lengths = (2500, 1000, 3200)

    def __len__(self) -> int:
        return 3

    def checked_events(self, i: int):
        n = 20
        t = np.linspace(500, 500 + self.lengths[i] - 1, n).astype(np.int64)
        return make_events(np.full(n, i), np.arange(n) % 8, t, np.ones(n, bool)), 0


def test_a_recording_stream_plays_every_recording_once_per_pass_back_to_back():
    segs = list(RecordingStream(_Recordings(), dt_us=1000, passes=2, seed=0))
    which = [int(s.frames.sum((0, 1, 2)).argmax()) for s in segs]  # recording i has its events at x = i
    assert sorted(which[:3]) == [0, 1, 2] and sorted(which[3:]) == [0, 1, 2]
    assert [len(s.frames) for s in segs] == [-(-_Recordings.lengths[w] // 1000) for w in which]
    assert [s.label for s in segs] == [int(_Recordings.targets[w]) for w in which]
    assert all(int(s.frames.sum()) == 20 for s in segs)  # every event, from the recording's own start
    assert all(b.start_us == a.start_us + len(a.frames) * 1000 for a, b in zip(segs, segs[1:]))
    assert [s.index for s in segs] == list(range(6))
    assert len(_take(RecordingStream(_Recordings(), passes=None), 10)) == 10


def test_a_label_timeline_is_read_from_csv_and_refuses_bad_rows(tmp_path):
    good = tmp_path / "labels.csv"
    good.write_text("start_us,end_us,class\n0,1000,b\n2000,3500,0\n")
    timeline = LabelTimeline.read_csv(good, ("a", "b"))
    assert [timeline.label_at(t) for t in (0, 999, 1000, 2000, 3499, 3500)] == [1, 1, UNLABELLED, 0, 0, UNLABELLED]
    assert timeline.boundaries() == [0, 1000, 2000, 3500]
    for text, problem in (("0,100,c\n", "class 'c' is not one of"), ("0,100\n", "2 fields"),
                          ("100,50,a\n", "end 50 is not after start 100"), ("0,1x,a\n", "must be integers")):
        bad = tmp_path / "bad.csv"
        bad.write_text(text)
        with pytest.raises(ValueError, match=problem) as caught:
            LabelTimeline.read_csv(bad, ("a", "b"))
        assert str(bad) in str(caught.value)


class _Probe(Source):
    """Segments whose label is the process that made them; the third raises ``error``."""

    classes, sensor_size = ("a",), (2, 2, 2)

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    def __next__(self) -> Segment:
        if self.next_index == 2:
            raise self.error
        self.next_index += 1
        return Segment(self.next_index - 1, torch.zeros(3, 2, 2, 2), os.getpid(), 0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="segments are made apart where a process forks")
def test_prefetch_makes_a_sources_segments_in_another_process_and_passes_errors_on():
    plain = _take(MotionStream(seed=5, min_ms=10, max_ms=20), 5)
    rng = torch.get_rng_state()
    fetched = Prefetch(MotionStream(seed=5, min_ms=10, max_ms=20))
    got = _take(fetched, 5)
    fetched.close()
    assert fetched.apart and torch.equal(torch.get_rng_state(), rng)  # the learner's random stream is untouched
    assert all(torch.equal(a.frames, b.frames) and a.label == b.label and a.start_us == b.start_us
               for a, b in zip(plain, got))
    for error in (EventFileError("rec7.bin", "it is torn"), ValueError("recording 7 is torn")):
        failing = Prefetch(_Probe(error))
        pids = {next(failing).label for _ in range(2)}
        assert len(pids) == 1 and os.getpid() not in pids
        with pytest.raises(type(error), match="torn") as caught:
            next(failing)
        assert str(caught.value) == str(error)
        failing.close()


def test_prefetch_makes_other_sources_in_a_thread_and_passes_errors_on():
    plain = _take(MotionStream(seed=5, min_ms=10, max_ms=20), 2)

    def broken():
        yield from plain
        raise ValueError("recording 7 is torn")

    failing = Prefetch(broken())
    assert not failing.apart
    assert [next(failing).index for _ in range(2)] == [0, 1]
    with pytest.raises(ValueError, match="recording 7 is torn"):
        next(failing)
    failing.close()


@pytest.mark.oracle
def test_aedat4_files_that_dv_processing_writes_stream_as_their_events(tmp_path):
    dv = pytest.importorskip("dv_processing", reason="dv-processing is installed by ./dev test (tests/oracles.txt)")
    path = tmp_path / "rec.aedat4"
    writer = dv.io.MonoCameraWriter(str(path), dv.io.MonoCameraWriter.EventOnlyConfig("DVXplorer_test", (32, 32)))
    rng = np.random.default_rng(0)
    t0 = 1_700_000_000_000
    t = np.sort(rng.integers(0, 250_000, 4000))
    x, y, p = rng.integers(0, 32, 4000), rng.integers(0, 32, 4000), rng.integers(0, 2, 4000)
    store = dv.EventStore()
    for ti, xi, yi, pi in zip(t, x, y, p):
        store.push_back(int(t0 + ti), int(xi), int(yi), bool(pi))
    writer.writeEvents(store)
    del writer
    labels = tmp_path / "labels.csv"
    labels.write_text("30000,120000,up\n")
    stream = Aedat4Stream(path, classes=("down", "up"), labels=LabelTimeline.read_csv(labels, ("down", "up")),
                          segment_ms=100)
    segs = list(stream)
    assert [s.start_us for s in segs] == [0, 30_000, 120_000, 220_000]  # cut at the label's edges, at most 100 ms
    assert [s.label for s in segs] == [UNLABELLED, 1, UNLABELLED, UNLABELLED]
    frames = torch.cat([s.frames for s in segs])
    ev = make_events(x, y, t - t[0], p)
    expected = np.zeros((len(frames), 2, 32, 32), np.float32)
    np.add.at(expected, ((t - t[0]) // 1000, p, y, x), 1)
    assert torch.equal(frames, torch.from_numpy(expected)) and int(frames.sum()) == len(ev)
    with pytest.raises(ValueError, match="no such file"):
        Aedat4Stream(tmp_path / "missing.aedat4")


# --- the learner ----------------------------------------------------------------------------------


def _learner(out, learn: bool = True, **kwargs) -> StreamLearner:
    torch.manual_seed(0)
    cfg = load_config("stream")
    net = build_network(cfg.network, (2, 16, 16), 8, seed=0)
    opt = torch.optim.Adamax(net.parameters(), lr=1e-3, betas=(0.0, 0.95))
    return StreamLearner(net, DecolleRule(net, opt, burn_in=5), opt, out, learn=learn, progress=False,
                         log=lambda m: None, **kwargs)


class _Segments:
    """A source of given segments (seekable)."""

    def __init__(self, segments) -> None:
        self.segments, self.next_index = segments, 0

    def seek(self, segment: int, start_us: int) -> None:
        self.next_index = segment

    def __iter__(self):
        return self

    def __next__(self) -> Segment:
        if self.next_index >= len(self.segments):
            raise StopIteration
        self.next_index += 1
        return self.segments[self.next_index - 1]


def test_the_state_is_never_reset_across_segments(tmp_path):
    """Two segments of one class streamed one after the other learn exactly what one sequence
    of both does: the state carries over, and the burn-in is only at the stream's start."""
    segs = _take(MotionStream(seed=2, min_ms=30, max_ms=40, downsample=2), 2)
    segs = [s._replace(label=segs[0].label, truth=segs[0].label) for s in segs]
    learner = _learner(tmp_path / "stream", window_steps=10_000)
    learner.run(_Segments(segs))
    reference = _learner(tmp_path / "unused")
    x = torch.cat([s.frames for s in segs])[None]
    reference.rule.train_sequence(x, torch.tensor([segs[0].label]))
    for a, b in zip(learner.network.state_dict().values(), reference.network.state_dict().values()):
        assert torch.equal(a, b)


def test_every_step_is_judged_before_it_is_learned_from(tmp_path):
    """Prequential: a window's accuracy is the fraction of steps whose readout voted for the true
    class, the same readouts the learning step used."""
    segs = _take(MotionStream(seed=6, min_ms=30, max_ms=30, downsample=2), 4)
    learner = _learner(tmp_path / "frozen", learn=False, window_steps=60)
    learner.run(_Segments(segs))
    rows = read_rows(tmp_path / "frozen")
    assert [r["step"] for r in rows] == [60, 120] and all(r["learned_fraction"] == 0 for r in rows)
    from threefactor import predict_sequence

    reference = _learner(tmp_path / "unused", learn=False)
    state, correct = None, []
    for i, s in enumerate(segs):
        res = predict_sequence(reference.network.eval(), s.frames[None], None, 5 if i == 0 else 0, state=state)
        state = res.state
        correct.append(res.votes[:, 0, s.truth])
    per_window = [(correct[0] + correct[1]) / 60, (correct[2] + correct[3]) / 60]
    for row, expected in zip(rows, per_window):
        assert row["accuracy"] == pytest.approx(expected.tolist())


def test_unlabelled_segments_are_judged_but_not_learned_from(tmp_path):
    segs = _take(MotionStream(seed=8, min_ms=30, max_ms=30, downsample=2, scenario=Scenario(label_fraction=0.5)), 8)
    learner = _learner(tmp_path / "sparse", window_steps=240)
    before = {k: v.clone() for k, v in learner.network.state_dict().items()}
    learner.run(_Segments([s for s in segs if s.label == UNLABELLED]))
    assert all(torch.equal(before[k], v) for k, v in learner.network.state_dict().items())
    row = read_rows(tmp_path / "sparse")[-1]
    assert row["learned_fraction"] == 0 and row["judged_fraction"] == 1 and row["accuracy"] is not None


def test_files_grow_with_windows_only_and_the_plot_is_drawn(tmp_path):
    cfg = load_config("stream", [*SMALL, "train.plots=true", "stream.plot_every=1"])
    from threefactor.stream.from_config import stream

    summary = stream(cfg, tmp_path / "run", log=lambda m: None)
    rows = read_rows(tmp_path / "run")
    assert summary["steps"] >= 1500 and len(rows) == summary["rows"] <= summary["steps"] // 500 + 1
    assert (tmp_path / "run" / "plots" / "stream.png").read_bytes()[:4] == b"\x89PNG"
    assert all(0 <= r["judged_fraction"] <= 1 and r["steps_per_s"] > 0 for r in rows)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks "
                                              "uordblks fordblks keepcost".split()]


class _MallocProbe(Source):
    """In the process that makes segments: how many mappings of its own a buffer larger than
    the heap's free memory adds (as label), and one of a small buffer (as truth)."""

    classes, sensor_size = ("a",), (2, 2, 2)

    def __next__(self) -> Segment:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
        mallinfo2.restype = _MallInfo2

        def mappings(nbytes: int) -> int:
            before = mallinfo2().hblks
            buffer = np.ones(nbytes // 8)  # noqa: F841 - held while counting
            return mallinfo2().hblks - before

        # malloc takes a large buffer from a free chunk of the heap where one fits, so the large
        # one is larger than all the heap's free memory: it would have to grow the heap
        large = mappings(mallinfo2().fordblks + 4 * SEGMENT_MMAP_THRESHOLD)
        small = mappings(SEGMENT_MMAP_THRESHOLD // 4)
        return Segment(0, torch.zeros(1, 2, 2, 2), large, 0, small)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt and mallinfo2 are glibc's (Linux)")
def test_the_process_making_segments_maps_segment_sized_buffers_apart_from_its_heap():
    # segments of every length, each buffer sized by its length, fragment a heap they share
    # with what outlives them: only buffers of their own mapping keep the peak flat
    try:
        ctypes.CDLL(None).mallinfo2
    except AttributeError:
        pytest.skip("a glibc older than 2.33 (no mallinfo2)")
    from threefactor.run.allocator import retain_freed_memory

    retain_freed_memory()  # the learner's process keeps what it frees, as training does
    made = Prefetch(_MallocProbe())
    probe = next(made)
    made.close()
    assert (probe.label, probe.truth) == (1, 0)  # a segment-sized buffer never grows the heap, a step's does


class _TornAfter(MotionStream):
    """A motion stream whose third segment comes from a recording that cannot be read."""

    def __next__(self) -> Segment:
        if self.next_index == 2:
            raise EventFileError("rec7.bin", "it is torn")
        return super().__next__()


def test_a_torn_recording_stops_the_stream_in_one_sentence_keeping_its_checkpoint(tmp_path):
    learner = _learner(tmp_path / "run")
    with pytest.raises(RunError, match=r"^the stream stopped at segment 2 \(step \d+\): cannot read rec7\.bin: it is "
                                       r"torn; the last checkpoint is kept in \S+checkpoint\.pt$"):
        learner.run(_TornAfter(seed=1, min_ms=20, max_ms=30, downsample=2), None)
    assert "stream" in read_checkpoint(tmp_path / "run")


def test_a_dataset_stream_plays_every_recording_once_per_pass_through_the_worker_process(tmp_path):
    from threefactor.stream.from_config import make_source, stream

    overrides = [*SMALL, "stream.source=dataset", "data.n_train=12", "stream.passes=2",
                 "stream.steps=null", "stream.window_steps=100"]
    cfg = load_config("stream", overrides)
    source = make_source(cfg)
    assert Prefetch(source).apart  # the recordings are read in the worker process
    expected = _take(make_source(cfg), 24)
    summary = stream(cfg, tmp_path / "run", log=lambda m: None)
    assert summary["segments"] == 24  # 2 passes over 12 recordings, then the source ends
    assert summary["steps"] == sum(len(s.frames) for s in expected)
    assert sum(r["learned_fraction"] * r["steps"] for r in read_rows(tmp_path / "run")) > 0


def test_a_diverging_stream_stops_in_one_sentence_keeping_its_checkpoint(tmp_path):
    from threefactor.stream.from_config import stream

    cfg = load_config("stream", [*SMALL, "optim.lr=1e6"])
    with pytest.raises(RunError, match=r"^the stream diverged at segment \d+ \(step \d+\): .*last good checkpoint"):
        stream(cfg, tmp_path / "run", log=lambda m: None)
    assert "stream" in read_checkpoint(tmp_path / "run")


def test_bad_stream_settings_are_one_sentence(tmp_path, capsys):
    from threefactor.cli import main

    for args, message in (
        (["--set", "stream.max_ms=10"], "'stream.max_ms' (10) must be >= 'stream.min_ms' (60)"),
        (["--set", "stream.sorce=motion"], "unknown key 'stream.sorce'"),
        (["--set", "stream.source=aedat4"], "needs 'stream.path'"),
        (["--set", "stream.label_fraction=0"], "'stream.label_fraction' must be in (0, 1]"),
        (["--resume", str(tmp_path)], "no config.yaml there"),
    ):
        assert main(["stream", "--out", str(tmp_path / "x"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err


KILLABLE = textwrap.dedent('''
    import sys, time
    from pathlib import Path
    from threefactor.config import load_config
    from threefactor.stream.from_config import stream
    from threefactor.stream.learner import StreamObserver

    out, marker, stall_at = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    class Stall(StreamObserver):
        def on_window(self, row):
            if row["step"] >= stall_at:
                marker.write_text("stalled")
                time.sleep(600)
    overrides = sys.argv[4:]
    stream(load_config("stream", overrides), out, log=lambda m: None, observers=[Stall()] if stall_at else [])
''')


def test_a_stream_killed_by_sigkill_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path):
    script = tmp_path / "stream_script.py"
    script.write_text(KILLABLE)
    # compiled, as the preset streams: the resumed process compiles its step anew
    settings = [*SMALL, "stream.steps=2500", "stream.checkpoint_every_steps=400", "network.dropout=0.2",
                "rule.compile=true"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    whole = subprocess.Popen([sys.executable, str(script), str(tmp_path / "whole"), "-", "0", *settings],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    marker = tmp_path / "stalled"
    killed = subprocess.Popen([sys.executable, str(script), str(tmp_path / "killed"), str(marker), "1200", *settings],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wait_for_marker(killed, marker)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=30)
    assert killed.returncode == -signal.SIGKILL
    stopped_at = read_checkpoint(tmp_path / "killed")["stream"]["step"]
    assert 0 < stopped_at < 2500
    resumed = subprocess.run([sys.executable, "-m", "threefactor", "stream", "--resume", str(tmp_path / "killed")],
                             capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming the stream" in resumed.stdout + resumed.stderr
    out, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err
    a, b = read_checkpoint(tmp_path / "whole"), read_checkpoint(tmp_path / "killed")
    assert a["stream"]["step"] == b["stream"]["step"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["stream"]["network_state"], b["stream"]["network_state"]):
        assert all(torch.equal(u, v) for u, v in zip(sa, sb))


# --- measures -------------------------------------------------------------------------------------


def _rows(accs, window_s: float = 1.0):
    return [{"time_s": (i + 1) * window_s, "accuracy": [a], "steps": 1000, "judged_fraction": 1.0}
            for i, a in enumerate(accs)]


def test_continual_measures_on_known_curves():
    assert average_accuracy(_rows([0.5, 1.0])) == pytest.approx(0.75)
    rows = _rows([0.5, 1.0])
    rows[1]["judged_fraction"] = 0.5
    assert average_accuracy(rows) == pytest.approx((0.5 + 0.5) / 1.5)
    assert average_accuracy([{"accuracy": None, "steps": 10, "judged_fraction": 0}]) is None
    assert forgetting([{"a": 0.9}, {"a": 0.7, "b": 0.8}, {"a": 0.4, "b": 0.9}]) == pytest.approx(0.5)
    assert forgetting([{"a": 0.9}]) is None
    curve = _rows([0.9, 0.9, 0.9, 0.3, 0.5, 0.8, 0.9])  # the shift at 3 s; back within 0.05 at 6 s
    assert recovery_time(curve, shift_s=3.0, tolerance=0.15) == pytest.approx(2.0)
    assert recovery_time(curve, shift_s=3.0, tolerance=0.0) == pytest.approx(3.0)
    assert recovery_time(_rows([0.9, 0.9, 0.2, 0.2]), shift_s=2.0) is None


def test_parallel_streams_learn_side_by_side_as_one_batch(tmp_path):
    from threefactor.stream.sources import ParallelStreams

    sources = [MotionStream(seed, 30, 30, downsample=2) for seed in (1, 2, 3)]
    batch = next(ParallelStreams(sources))
    alone = [next(MotionStream(seed, 30, 30, downsample=2)) for seed in (1, 2, 3)]
    assert batch.frames.shape == (3, 30, 2, 16, 16)
    assert all(torch.equal(batch.frames[i], a.frames) for i, a in enumerate(alone))
    assert batch.label.tolist() == [a.label for a in alone]
    with pytest.raises(ValueError, match="segments of one length"):
        next(ParallelStreams([MotionStream(1, 30, 30), MotionStream(2, 40, 40)]))
    learner = _learner(tmp_path / "par", window_steps=60)
    learner.run(ParallelStreams([MotionStream(seed, 30, 30, downsample=2) for seed in (1, 2, 3)]), steps=90)
    rows = read_rows(tmp_path / "par")
    assert [r["step"] for r in rows] == [60, 90] and all(0 <= r["accuracy"][-1] <= 1 for r in rows)
    from threefactor.config import load_config as load

    with pytest.raises(Exception, match="needs stream.source 'motion' with segments of one length"):
        load("stream", ["stream.parallel=4"])
