"""Online learning on an unbounded stream, evaluated prequentially, in a run that lasts.

``StreamLearner(network, rule, optimizer, out_dir).run(source, steps)`` feeds the segments of
``source`` (``stream.sources``) through the network one after another without ever resetting
its state. Every step is evaluated *prequentially* (test, then train): the readout of the step
predicts, then the rule learns from the same step (DECOLLE's update follows the forward pass it judged). Segments without a label are only
predicted; ``learn=False`` (or ``learn_until`` a segment) turns learning off.

The run directory is the trainer's: a lock, ``config.yaml``, sealed checkpoints, and
``stream.jsonl`` with one row per window of ``window_steps`` steps (per-layer accuracy over the
window, loss, firing rate, steps per second, the real-time factor = stream time per wall
second), so memory and files grow with the number of windows only. A checkpoint (every
``checkpoint_every_steps`` steps or ``checkpoint_every_s`` seconds, at a segment boundary) holds
the weights, the optimiser, the network's state, the stream position and every random stream:
``run(..., resume=True)`` continues a killed stream to the same weights as an uninterrupted one.
The divergence guard stops a stream whose losses or weights blow up, keeping the last good
checkpoint. Observers (``on_window(row)``, ``close()``) see every row: ``report.stream_plot``
redraws the running accuracy against stream time as the stream goes.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from tqdm import tqdm

from ..errors import RunDirectoryError, RunError
from ..rules.common import predict_sequence
from ..run.checkpoint import checkpoint_bytes, parse_checkpoint, write_checkpoint
from ..run.directory import CHECKPOINT_NAME, RunDirectory
from ..run.divergence import DivergenceGuard, nonfinite_problem
from ..run.progress import rng_states, set_rng_states
from .prefetch import Prefetch
from .sources import UNLABELLED, Segment

METRICS_NAME = "stream.jsonl"


class StreamObserver:
    """Watches a stream: ``on_window`` gets every metrics row as it is written."""

    def on_window(self, row: dict) -> None: ...

    def close(self) -> None: ...


@dataclass
class _Window:
    """Running sums of the current window (and what a checkpoint keeps of them)."""

    n_layers: int
    steps: int = 0
    judged: int = 0  # steps whose true class is known
    learned: int = 0  # steps the rule learned from
    wall_s: float = 0.0

    def __post_init__(self) -> None:
        self.correct = torch.zeros(self.n_layers, dtype=torch.float64)
        self.loss = torch.zeros(self.n_layers, dtype=torch.float64)
        self.rates = torch.zeros(self.n_layers, dtype=torch.float64)

    def state(self) -> dict:
        return {"steps": self.steps, "judged": self.judged, "learned": self.learned, "wall_s": self.wall_s,
                "correct": self.correct, "loss": self.loss, "rates": self.rates}

    @classmethod
    def restore(cls, n_layers: int, s: dict) -> "_Window":
        w = cls(n_layers, s["steps"], s["judged"], s["learned"], s["wall_s"])
        w.correct, w.loss, w.rates = s["correct"], s["loss"], s["rates"]
        return w


class StreamLearner:
    """Learns from a stream into ``out_dir`` (see the module's docstring).

    ``window_steps``: the steps of one metrics row. ``learn_until``: learning stops at this
    segment (a network frozen after a first phase); ``learn=False`` never learns (inference only).
    ``config_text`` becomes ``config.yaml``. ``loss`` and ``burn_in`` (the start of the stream
    only) are the rule's by default.
    """

    def __init__(self, network: nn.Module, rule: Any, optimizer: torch.optim.Optimizer, out_dir: str | Path, *,
                 window_steps: int = 1000, checkpoint_every_steps: int = 50_000, checkpoint_every_s: float = 600.0,
                 learn: bool = True, learn_until: int | None = None, divergence_factor: float = 1000.0,
                 observers: Sequence[StreamObserver] = (), progress: bool = True,
                 log: Callable[[str], None] = print, config_text: str | None = None) -> None:
        if window_steps < 1:
            raise ValueError(f"window_steps must be >= 1, got {window_steps}")
        self.network, self.rule, self.optimizer = network, rule, optimizer
        self.out = Path(out_dir)
        self.window_steps = window_steps
        self.checkpoint_every_steps, self.checkpoint_every_s = checkpoint_every_steps, checkpoint_every_s
        self.learn, self.learn_until = learn, learn_until
        self.divergence_factor = divergence_factor
        self.observers, self.progress, self.log = list(observers), progress, log
        self.config_text = config_text or (
            f"# a stream of threefactor.stream.StreamLearner built in Python\nrule: {type(rule).__name__}\n"
            f"window_steps: {window_steps}\n")
        self.loss = getattr(rule, "loss", "smooth_l1")
        self.burn_in = getattr(rule, "burn_in", 0)
        self.n_layers = len(network.layers)

    def run(self, source: Iterator[Segment], steps: int | None = None, *, resume: bool = False) -> dict:
        """Learn from ``source`` until ``steps`` steps in all (at the end of the segment that
        reaches them; None: until the source ends) and return the summary; with ``resume``,
        continue the stream of ``out_dir``."""
        try:
            run_dir = RunDirectory.open(self.out, self.config_text, resume, metrics_name=METRICS_NAME)
        except RunDirectoryError as err:
            raise RunError(str(err)) from None
        try:
            return _Stream(self, run_dir, source, steps).run()
        finally:
            run_dir.close()
            for o in self.observers:
                o.close()


class _Stream:
    def __init__(self, learner: StreamLearner, run_dir: RunDirectory, source, steps: int | None) -> None:
        self.l, self.run_dir, self.source, self.max_steps = learner, run_dir, source, steps
        self.network, self.optimizer = learner.network, learner.optimizer
        self.device = next(self.network.parameters()).device
        self.ckpt = learner.out / CHECKPOINT_NAME
        self.metrics = run_dir.metrics
        self.dt_us = getattr(source, "dt_us", 1000)

    # --- state ------------------------------------------------------------------------------

    def start(self) -> None:
        self.state = None  # the network's state: never reset while the stream goes on
        self.saved_state = None
        self.step = 0
        self.segment = 0
        self.start_us = 0
        self.elapsed_before = 0.0
        self.window = _Window(self.l.n_layers)
        self.guard = DivergenceGuard(self.l.divergence_factor, self.network)
        if self.run_dir.fresh:
            return
        payload = parse_checkpoint(self.ckpt, checkpoint_bytes(self.ckpt))
        p = payload.get("stream")
        if not isinstance(p, dict):
            raise RunError(f"{self.ckpt}: not a stream's checkpoint (no stream position in it)")
        try:
            self.network.load_state_dict(payload["model"])
            self.optimizer.load_state_dict(payload["optimizer"])
        except (KeyError, RuntimeError, ValueError):
            raise RunError(f"{self.ckpt}: its weights or optimiser state do not fit this network") from None
        self.saved_state = p["network_state"]  # made the network's own state types at the first step
        self.step, self.segment, self.start_us = p["step"], p["segment"], p["start_us"]
        self.elapsed_before = p["elapsed_s"]
        self.window = _Window.restore(self.l.n_layers, p["window"])
        self.guard = DivergenceGuard(self.l.divergence_factor, self.network, p["divergence"])
        set_rng_states(p["rng"], self.device)
        self.metrics.seek(0, os.SEEK_END)
        if self.metrics.tell() < p["metrics_bytes"]:
            raise RunError(f"{self.l.out / METRICS_NAME}: shorter than when the checkpoint was written")
        self.metrics.truncate(p["metrics_bytes"])
        self.metrics.seek(p["metrics_bytes"])
        self.source.seek(self.segment, self.start_us)
        self.l.log(f"resuming the stream in {self.l.out} at step {self.step} (segment {self.segment}, "
                   f"{self.start_us / 1e6:.1f} s of stream time)")

    def checkpoint(self) -> None:
        self.last_checkpoint = (self.step, time.perf_counter())
        write_checkpoint(self.ckpt, {
            "config": self.l.config_text, "model": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "stream": {
                "step": self.step, "segment": self.segment, "start_us": self.start_us,
                "network_state": None if self.state is None else [list(s) for s in self.state],
                "window": self.window.state(), "divergence": self.guard.state(),
                "rng": rng_states(self.device), "metrics_bytes": self.metrics.tell(),
                "elapsed_s": self.now_s(),
            },
        })

    def now_s(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t0

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> dict:
        self.t0 = time.perf_counter()
        self.start()
        if self.run_dir.fresh:
            self.checkpoint()
        self.run_dir.started()
        self.last_checkpoint = (self.step, time.perf_counter())
        source = Prefetch(self.source)  # the next segments are made while this one learns
        bar = tqdm(total=self.max_steps, initial=self.step, unit="step", desc="stream",
                   disable=not self.l.progress, dynamic_ncols=True, leave=False)
        sim_before = self.start_us
        try:
            while self.max_steps is None or self.step < self.max_steps:
                try:
                    seg = next(source)
                except StopIteration:
                    break
                except (ValueError, OSError) as err:  # a torn recording, a missing file
                    raise RunError(f"the stream stopped at segment {self.segment} (step {self.step}): "
                                   f"{str(err).rstrip('.')}; the last checkpoint is kept in {self.ckpt}") from None
                t_seg = time.perf_counter()
                self.learn_from(seg)
                self.window.wall_s += time.perf_counter() - t_seg
                steps = seg.frames.shape[-4]  # (T, P, H, W), or (B, T, P, H, W) for parallel streams
                bar.update(steps)
                self.step += steps
                self.segment, self.start_us = seg.index + 1, seg.start_us + steps * self.dt_us
                if self.window.steps >= self.l.window_steps:
                    self.write_row()
                    bar.set_postfix_str(self.postfix)
                since_steps, since_t = self.last_checkpoint
                if (self.l.checkpoint_every_steps and self.step - since_steps >= self.l.checkpoint_every_steps) \
                        or (self.l.checkpoint_every_s and time.perf_counter() - since_t >= self.l.checkpoint_every_s):
                    self.checkpoint()
        finally:
            bar.close()
            source.close()
        if self.window.steps:
            self.write_row()
        self.checkpoint()
        summary = {"steps": self.step, "segments": self.segment, "stream_time_s": self.start_us / 1e6,
                   "wall_time_s": self.now_s(), "rows": self.rows_written(),
                   "steps_per_s": self.step / max(self.now_s(), 1e-9),
                   "realtime_factor": (self.start_us - sim_before) / 1e6 / max(time.perf_counter() - self.t0, 1e-9)}
        (self.l.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def learns(self, seg: Segment) -> bool:
        labelled = bool((torch.as_tensor(seg.label) != UNLABELLED).all())
        return (self.l.learn and labelled
                and (self.l.learn_until is None or seg.index < self.l.learn_until))

    def learn_from(self, seg: Segment) -> None:
        batched = seg.frames.dim() == 5  # parallel streams: (B, T, ...)
        x = (seg.frames if batched else seg.frames[None]).to(self.device, torch.float32)
        label = torch.as_tensor(seg.label).reshape(-1).to(self.device)
        truth = torch.as_tensor(seg.truth).reshape(-1).to(self.device)
        if not torch.isfinite(x).all():
            raise RunError(f"segment {seg.index} of the stream holds NaN or Inf frames")
        if self.saved_state is not None:
            self.state, self.saved_state = _restore_state(self.network, self.saved_state, x), None
        learning = self.learns(seg)
        self.network.train(learning)  # readout dropout, where the network has it, only while learning
        if learning:
            res = self.l.rule.train_sequence(x, label, state=self.state)
        else:
            known = bool((truth != UNLABELLED).all())
            res = predict_sequence(self.network, x, truth if known else None,
                                   self.l.burn_in if self.state is None else 0, self.l.loss,
                                   getattr(self.l.rule, "precision", "fp32"), state=self.state)
        self.state = res.state
        steps = x.shape[1]
        w = self.window
        w.steps += steps
        w.rates += res.rates.detach().double().cpu() * steps
        judged = truth != UNLABELLED
        if bool(judged.any()):
            # per layer, the steps whose vote was the true class, summed over the judged streams
            votes = res.votes[:, judged].gather(2, truth[judged][None, :, None].expand(len(res.votes), -1, 1))
            w.correct += votes.sum((1, 2)).detach().double().cpu() / len(truth)
            w.judged += steps * int(judged.sum()) / len(truth)
            w.loss += res.loss.detach().double().cpu() * steps
        if learning:
            w.learned += steps
            norms = self.guard.norms(self.network)
            losses = res.loss.detach().cpu().tolist()
            problem = nonfinite_problem(res.loss.detach().cpu(), self.network)
            problem = problem or self.guard.weight_problem(norms) or self.guard.loss_problem(losses)
            if problem is not None:
                raise RunError(f"the stream diverged at segment {seg.index} (step {self.step}): {problem}; it was "
                               f"stopped and the last good checkpoint is kept in {self.ckpt}; lower the learning rate")
            self.guard.accept(losses, norms)

    def write_row(self) -> None:
        w = self.window
        judged = max(w.judged, 1)
        row = {
            "step": self.step, "segment": self.segment, "time_s": self.start_us / 1e6,
            "accuracy": (w.correct / judged).tolist() if w.judged else None,
            "loss": (w.loss / judged).tolist() if w.judged else None,
            "firing_rate": (w.rates / max(w.steps, 1)).tolist(),
            "steps": w.steps, "judged_fraction": w.judged / max(w.steps, 1),
            "learned_fraction": w.learned / max(w.steps, 1),
            "steps_per_s": w.steps / max(w.wall_s, 1e-9),
            "realtime_factor": w.steps * self.dt_us * 1e-6 / max(w.wall_s, 1e-9),
            "wall_s": self.now_s(),
        }
        self.metrics.write((json.dumps(row) + "\n").encode())
        self.metrics.flush()
        acc = "" if row["accuracy"] is None else f"acc {row['accuracy'][-1]:.3f}, "
        self.postfix = f"{acc}{row['steps_per_s']:.0f} steps/s, x{row['realtime_factor']:.2f} real time"
        for o in self.l.observers:
            o.on_window(row)
        self.window = _Window(self.l.n_layers)

    def rows_written(self) -> int:
        self.metrics.flush()
        return sum(1 for _ in open(self.l.out / METRICS_NAME, "rb"))


def _restore_state(network: nn.Module, saved: list, x: torch.Tensor) -> tuple:
    """The network's state from a checkpoint's tensors, in the state types of its layers (taken
    from one step of the network on ``x``'s first frame, with the random streams untouched)."""
    with torch.no_grad(), torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        _, template = network(x[:, 0], None)
    if len(template) != len(saved):
        raise RunError(f"the checkpoint holds the state of {len(saved)} layers, the network has {len(template)}")
    return tuple(type(t)(*(v.to(x.device) for v in s)) for t, s in zip(template, saved))


def read_rows(run_dir: str | Path) -> list[dict]:
    """The rows of a stream's ``stream.jsonl`` (a row being written is skipped)."""
    rows = []
    for line in (Path(run_dir) / METRICS_NAME).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
