"""The trainer: epochs of online learning over any batches, with every feature of a run.

``Trainer(network, rule, optimizer, out_dir).fit(train_batches, test_batches)`` trains on any
iterable of batches ``(frames (B, T, ...), labels (B,))``: a ``DataLoader`` over your own
``Dataset`` (Tonic's included), a list of tensors, the config-built data of ``threefactor
train``. A run directory holds ``config.yaml`` (what the run is), ``metrics.jsonl`` (one row
per epoch, split and layer; layers numbered from 1), ``checkpoint.pt`` and, at the end,
``summary.json``; observers (``threefactor.report``: TensorBoard, plots, your own) are told of
every batch, evaluation, epoch, checkpoint and the end.

A run holds an exclusive lock on its directory for its whole life (``RunDirectory``); a new run
that fails before its first checkpoint removes what it wrote. Checkpoints are sealed and
atomic (``run.checkpoint``), written at the start, at the end of every epoch and every
``checkpoint_every`` batches; ``fit(..., resume=True)`` continues a killed run and ends with
the same weights, bit for bit (same device and software), and the same metrics rows. For that,
an epoch's data order must follow from torch's random stream, which the trainer seeds per
epoch (``progress.epoch_seed``): a ``DataLoader(shuffle=True)`` without a ``generator`` of its
own does. Resuming in the middle of an epoch iterates the epoch's first batches again without
training on them.

Divergence stops a run before its weights are checkpointed (``run.divergence``): NaN or Inf in
a loss or weight, or a layer's loss or weight norm beyond ``divergence_factor`` times its
running value; the last good checkpoint is kept. Inputs that are NaN or Inf, labels outside
the readouts' classes and frames of a shape the network cannot take are refused in one
sentence naming the batch.

Under ``torchrun`` with more than one process (``run.collective``) every process iterates the
same batches and takes a contiguous share of each (the batch of all processes together), the
models are kept in step by the ``Synchroniser``, metrics are sums over all processes, and
process 0 alone writes the run directory, logs and calls the observers.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..errors import DistributedError, RunDirectoryError, RunError
from ..rules.common import SequenceResult
from . import collective
from .checkpoint import checkpoint_bytes, parse_checkpoint, read_checkpoint, write_checkpoint
from .collective import DistInfo, Synchroniser, everywhere, mean_stats, together
from .directory import CHECKPOINT_NAME, METRICS_NAME, RunDirectory
from .divergence import DivergenceGuard, nonfinite_problem
from .evaluate import batch_accuracy, evaluate
from .observer import BatchMetrics, Observer, RunStart, SplitMetrics
from .progress import Progress, epoch_seed, rng_states, set_rng_states


# The keys of a checkpoint's payload that the trainer writes itself (``meta`` adds others).
RESERVED_KEYS = frozenset({"format", "version", "config", "epoch", "model", "optimizer", "scheduler", "progress"})


# --- the trainer -------------------------------------------------------------------------------


class Trainer:
    """Trains ``network`` with ``rule`` (its ``optimizer`` stepped by the rule) into ``out_dir``.

    ``scheduler`` steps once per epoch. ``loss`` and ``burn_in`` are those of the evaluation
    (by default the rule's). ``config_text`` is written as the run's ``config.yaml`` (a run
    built in Python gets a description of the trainer's settings). ``meta`` (plain data, e.g.
    the classes and the input shape) is saved in every checkpoint and must be equal on resume;
    ``check_resume(payload)`` may refuse a checkpoint with a ``RunError``. ``eval_every``
    evaluates the test batches every so many training batches besides every epoch's end.
    ``sync``/``average_every``: how the processes are kept in step under torchrun
    (``Synchroniser``). ``progress``: a progress bar per epoch (rate and ETA).
    """

    def __init__(
        self,
        network: nn.Module,
        rule: Any,
        optimizer: torch.optim.Optimizer,
        out_dir: str | Path,
        *,
        epochs: int = 1,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        loss: Any = None,
        burn_in: int | None = None,
        checkpoint_every: int = 0,
        eval_every: int = 0,
        divergence_factor: float = 1000.0,
        seed: int = 0,
        observers: Sequence[Observer] = (),
        progress: bool = True,
        log: Callable[[str], None] = print,
        config_text: str | None = None,
        meta: dict | None = None,
        check_resume: Callable[[dict], None] | None = None,
        sync: str = "exact",
        average_every: int = 50,
        setting_names: dict[str, str] | None = None,
    ) -> None:
        self.network, self.rule, self.optimizer = network, rule, optimizer
        self.out = Path(out_dir)
        self.epochs = epochs
        self.scheduler = scheduler
        self.loss = loss if loss is not None else getattr(rule, "loss", "smooth_l1")
        self.burn_in = burn_in if burn_in is not None else getattr(rule, "burn_in", 0)
        self.checkpoint_every, self.eval_every = checkpoint_every, eval_every
        self.divergence_factor = divergence_factor
        self.seed = seed
        self.observers = list(observers)
        self.progress = progress
        self.log = log
        self.config_text = config_text if config_text is not None else self._describe()
        self.meta = dict(meta or {})
        reserved = set(self.meta) & RESERVED_KEYS
        if reserved:
            raise ValueError(f"meta may not use the checkpoint's own keys {sorted(reserved)}")
        self.check_resume = check_resume
        self.sync_mode, self.average_every = sync, average_every
        # how messages name the learning rate and the divergence factor (e.g. config keys)
        self.setting_names = {"lr": "the learning rate", "divergence_factor": "the divergence factor",
                              **(setting_names or {})}
        self.n_layers = len(network.layers)
        self.n_classes = int(network.readouts[0].g.shape[0])

    def _describe(self) -> str:
        """config.yaml of a run built in Python: what the trainer knows of it."""
        lines = ["# a run of threefactor.Trainer built in Python (not from a config file)",
                 f"rule: {type(self.rule).__name__}", f"optimizer: {type(self.optimizer).__name__}",
                 f"epochs: {self.epochs}", f"seed: {self.seed}", "network: |"]
        lines += ["  " + line for line in repr(self.network).splitlines()]
        return "\n".join(lines) + "\n"

    # --- the run ---------------------------------------------------------------------------

    def fit(self, train_batches: Iterable, test_batches: Iterable | None = None, *,
            resume: bool = False, run_dir: RunDirectory | None = None) -> dict:
        """Train for ``epochs`` epochs (evaluating ``test_batches`` after each) and return the
        summary; with ``resume``, continue the run in ``out_dir`` from its checkpoint.
        ``run_dir``: the run directory already opened by ``open_run_directory`` (for a caller
        that checks it before reading its data); it stays the caller's to close."""
        closers: list[Callable[[], None]] = []
        try:
            return self._fit(train_batches, test_batches, resume, run_dir, closers)
        finally:
            for close in reversed(closers):
                close()

    def _fit(self, train_batches, test_batches, resume: bool, run_dir: RunDirectory | None,
             closers: list) -> dict:
        device = next(self.network.parameters()).device
        try:
            info = collective.env_info()
            if info.enabled and not collective.group_ready():
                info, _ = collective.init_from_env(device)
                closers.append(collective.teardown)
        except DistributedError as err:
            raise RunError(str(err)) from None
        log = self.log if info.is_main else _silent
        observers = self.observers if info.is_main else []
        closers.extend(o.close for o in observers)
        if run_dir is None:
            run_dir = open_run_directory(self.out, self.config_text, resume, info, log)
            closers.append(run_dir.close)
        payload = None
        ckpt = self.out / CHECKPOINT_NAME
        if not info.enabled:
            if not run_dir.fresh:
                payload = self._checked_payload(ckpt, checkpoint_bytes(ckpt))
        elif not collective.broadcast_object(run_dir.fresh):
            # Process 0 alone reads the checkpoint; the others get its bytes from it (no shared
            # file system is needed for that).
            data = together(info, lambda: checkpoint_bytes(ckpt) if info.is_main else None)
            payload = together(info, lambda: self._checked_payload(ckpt, data) if info.is_main else None)
            data = collective.broadcast_object(data)
            if not info.is_main:
                payload = parse_checkpoint(ckpt, data)
            del data
        summary = _Run(self, train_batches, test_batches, device, info, run_dir, payload, log,
                       observers, closers).run()
        collective.wait_for_all()
        return summary

    def _checked_payload(self, path: Path, data: bytes) -> dict:
        payload = parse_checkpoint(path, data)
        if self.check_resume is not None:
            self.check_resume(payload)
        if not isinstance(payload.get("progress"), dict):
            raise RunError(f"{path}: the checkpoint holds no training progress to resume from")
        for key, now in self.meta.items():
            was = payload.get(key)
            if was is not None and now is not None and _plain(was) != _plain(now):
                raise RunError(f"{path}: written for {key.replace('_', ' ')} {_short(was)}, but this "
                               f"run has {_short(now)}")
        return payload


def open_run_directory(out: Path, config_text: str, resume: bool, info: DistInfo = collective.SINGLE,
                       log: Callable[[str], None] = print) -> RunDirectory:
    """The run directory ``out``, locked for this run and checked (for a new run, created with
    ``config_text`` as its config.yaml). Under torchrun process 0 alone opens it; the others
    get a stand-in, and a refusal is raised on every process."""
    def open_here() -> RunDirectory:
        try:
            run_dir = RunDirectory.open(out, config_text, resume)
        except RunDirectoryError as err:
            raise RunError(str(err)) from None
        if resume and run_dir.fresh:
            log(f"{out} has no checkpoint yet (its run stopped before the first one): starting it "
                "from its config.yaml")
        return run_dir

    return together(info, open_here if info.is_main else RunDirectory.detached)


class _Run:
    """One call of ``Trainer.fit``: the loop and the state it carries."""

    def __init__(self, trainer: Trainer, train_batches, test_batches, device, info: DistInfo,
                 run_dir: RunDirectory, payload: dict | None, log, observers, closers) -> None:
        self.t, self.train_batches, self.test_batches = trainer, train_batches, test_batches
        self.device, self.info, self.run_dir, self.payload = device, info, run_dir, payload
        self.log, self.observers = log, observers
        self.ckpt = trainer.out / CHECKPOINT_NAME
        self.metrics = run_dir.metrics
        self.network, self.optimizer = trainer.network, trainer.optimizer
        self.input_shape: list[int] | None = None
        self.t_start = time.perf_counter()
        self.sync = Synchroniser(self.optimizer, info, trainer.sync_mode, trainer.average_every)
        closers.append(self.sync.close)
        self.last_checkpoint: dict = {}
        self.elapsed_before = 0.0
        self.stats: dict | None = None  # the rule's figures of the last batch (e.g. trigger rates)

    def now_s(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_start

    def notify(self, method: str, *args) -> None:
        for o in self.observers:
            getattr(o, method)(*args)

    # --- starting and resuming -----------------------------------------------------------------

    def start(self) -> None:
        t, payload, info = self.t, self.payload, self.info
        if payload is None:
            self.st = Progress(t.n_layers)
            if info.enabled:
                collective.broadcast_module(self.network)  # every process starts from process 0's model
                torch.manual_seed(collective.rank_seed(t.seed, info.rank))  # its own dropout masks
            self.guard = DivergenceGuard(t.divergence_factor, self.network)
        else:
            try:
                self.network.load_state_dict(payload["model"])
            except (KeyError, RuntimeError):
                raise RunError(f"{self.ckpt}: its weights do not fit this network") from None
            try:
                self.optimizer.load_state_dict(payload["optimizer"])
                if t.scheduler is not None and payload.get("scheduler") is not None:
                    t.scheduler.load_state_dict(payload["scheduler"])
                self.st = Progress.from_payload(t.n_layers, payload["progress"])
                set_rng_states(payload["progress"]["rng"], self.device)
            except (KeyError, TypeError, ValueError, RuntimeError):
                raise RunError(f"{self.ckpt}: the checkpoint's training state does not fit this run") from None
            together(info, self.rewind_metrics if info.is_main else lambda: None)
            if info.enabled:
                self.set_rank_rng(payload["progress"])
            self.st.resumes += 1
            self.guard = DivergenceGuard(t.divergence_factor, self.network, payload["progress"].get("divergence"))
            self.input_shape = payload.get("input_shape")
            self.log(f"resuming {t.out}: {self.st.epoch_done} epochs and {self.st.batch} batches done "
                     f"({self.st.batches_total} batches in all)")
        self.elapsed_before = self.st.elapsed_s
        self.notify("on_start", RunStart(t.out, self.network, self.st.batches_total, payload is not None, self.log))

    def rewind_metrics(self) -> None:
        m, st = self.metrics, self.st
        m.seek(0, os.SEEK_END)
        if m.tell() < st.metrics_bytes:
            raise RunError(f"{self.t.out / METRICS_NAME}: shorter than when the checkpoint was written; "
                           "rows are missing, so the run cannot be continued")
        m.truncate(st.metrics_bytes)  # rows written after the checkpoint come again
        m.seek(st.metrics_bytes)

    def set_rank_rng(self, progress: dict) -> None:
        """Every process's own random state back when the checkpoint was written by as many
        processes; otherwise process 0 gets the checkpoint's and the others fresh streams."""
        states, info = progress.get("rank_rng"), self.info
        if isinstance(states, list) and len(states) == info.world_size:
            set_rng_states(states[info.rank], self.device)
        elif info.rank > 0:
            torch.manual_seed(collective.rank_seed(self.t.seed, info.rank, self.st.batches_total))

    # --- batches -----------------------------------------------------------------------------

    def epoch_batches(self, epoch: int) -> Iterator:
        """The epoch's batches, in the order torch's random stream seeded for this epoch gives
        (the first batch is drawn under that seed too: a sampler draws its order lazily)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(epoch_seed(self.t.seed, epoch))
            it = iter(self.train_batches)
            first = next(it, None)
        if first is None:
            raise RunError("the training batches are empty: the iterable gave no batch")
        yield first
        yield from it

    def unpack(self, batch, where: str) -> tuple[Tensor, Tensor]:
        """``(frames, labels)`` of a batch on the device, checked; RunError naming ``where``."""
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise RunError(f"{where}: a batch must be (frames, labels), got {type(batch).__name__}")
        x, y = (torch.as_tensor(v) for v in batch[:2])
        if x.dim() < 3:
            raise RunError(f"{where}: frames must be (batch, time, ...), got shape {list(x.shape)}")
        if y.dim() != 1 or len(y) != len(x) or y.is_floating_point() or y.is_complex():
            raise RunError(f"{where}: labels must be {len(x)} class indices (one per sample), got "
                           f"{y.dtype} of shape {list(y.shape)}")
        shape = list(x.shape[2:])
        if self.input_shape is None:
            self.input_shape = shape
        elif shape != list(self.input_shape):
            raise RunError(f"{where}: frames of shape {shape} per step, but the run's are {list(self.input_shape)}")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.t.n_classes):
            raise RunError(f"{where}: label {int(y.min()) if int(y.min()) < 0 else int(y.max())} is "
                           f"not one of the network's {self.t.n_classes} classes (0 to {self.t.n_classes - 1})")
        x = x.to(self.device, torch.float32, non_blocking=True)
        if not torch.isfinite(x).all():
            raise RunError(f"{where}: the frames hold NaN or Inf")
        return x, y.to(self.device)

    def share(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, int]:
        """This process's contiguous share of a global batch and its size; a process left
        without a sample runs the batch's first one with weight 0, so that all take the same steps."""
        if not self.info.enabled:
            return x, y, len(y)
        lo, hi = collective.shard(len(y), self.info.rank, self.info.world_size)
        if hi > lo:
            return x[lo:hi], y[lo:hi], hi - lo
        return x[:1], y[:1], 0

    def train_step(self, x: Tensor, y: Tensor, first: bool, where: str) -> SequenceResult:
        try:
            return self.t.rule.train_sequence(x, y)
        except RuntimeError as err:
            if not first:
                raise
            raise RunError(f"{where}: the network cannot take frames of shape {list(x.shape[2:])} "
                           f"({str(err).splitlines()[0]})") from None

    # --- figures -------------------------------------------------------------------------------

    def batch_sums(self, res: SequenceResult, y: Tensor, weight: int) -> "_BatchSums":
        """The batch's figures summed over its samples and the processes (one all-reduce)."""
        n = self.t.n_layers
        rates = res.rates.detach().double().cpu()
        if not self.info.enabled:
            return _BatchSums(batch_accuracy(res.votes, y).cpu().float(), res.loss.detach().cpu() * weight,
                              rates * weight, res.loss.detach().cpu(), weight)
        bad_here = not all(bool(torch.isfinite(p).all()) for p in self.network.parameters())
        local = torch.zeros(3 * n + 2, dtype=torch.float64)
        if weight:
            local[:n] = batch_accuracy(res.votes, y).cpu().double()
            local[n:2 * n] = res.loss.detach().cpu().double() * weight
            local[2 * n:3 * n] = rates * weight
        local[-2], local[-1] = weight, float(bad_here)
        total = collective.all_reduce_sum(local)
        elsewhere = None
        if total[-1] > 0 and not bad_here:
            elsewhere = "the weights of another process hold NaN or Inf"
        return _BatchSums(total[:n].float(), total[n:2 * n].float(), total[2 * n:3 * n],
                          (total[n:2 * n] / total[-2]).float(), int(total[-2]), elsewhere)

    def record(self, epoch: int, split: str, accs, losses, rates, stats: dict | None = None) -> None:
        st = self.st
        for i, (a, l, r) in enumerate(zip(accs, losses, rates)):
            row = {"epoch": epoch, "split": split, "layer": i + 1, "accuracy": a, "loss": l,
                   "firing_rate": r, "lr": self.optimizer.param_groups[0]["lr"],
                   "batch": st.batch, "batches": st.batches_total, "samples": st.samples,
                   "time_s": self.now_s()}
            # Rule-specific per-layer figures, e.g. the error-triggered update fraction.
            row.update({k: v[i] for k, v in (stats or {}).items() if isinstance(v, list) and len(v) > i})
            self.metrics.write((json.dumps(row) + "\n").encode())
        self.metrics.flush()
        self.notify("on_evaluation", SplitMetrics(epoch, st.batches_total, split, list(accs), list(losses),
                                                  list(rates)))

    def test_eval(self, epoch: int) -> None:
        if self.test_batches is None:
            return
        self.sync.consensus()
        acc, loss, rates = evaluate(self.network, self.test_batches, self.t.loss, self.t.burn_in,
                                    self.device, self.info, unpack=self.unpack,
                                    precision=getattr(self.t.rule, "precision", "fp32"))
        self.st.test_accuracy, self.st.test_loss = acc, loss
        self.record(epoch, "test", acc, loss, rates)

    # --- checkpoints ---------------------------------------------------------------------------

    def checkpoint(self) -> None:
        info, st = self.info, self.st
        self.sync.consensus()  # periodic mode: the checkpoint holds the processes' mean model
        rank_rng = collective.all_gather_object(rng_states(self.device)) if info.enabled else None
        self.last_checkpoint.update(epoch_done=st.epoch_done, batch=st.batch)
        if not info.is_main:
            return
        st.metrics_bytes = self.metrics.tell()
        st.elapsed_s = self.now_s()
        progress = st.to_payload(self.device)
        progress["divergence"] = self.guard.state()
        if rank_rng is not None:
            progress["rank_rng"] = rank_rng
        scheduler = self.t.scheduler
        write_checkpoint(self.ckpt, {
            "input_shape": self.input_shape, **self.t.meta, "config": self.t.config_text, "epoch": st.epoch_done,
            "model": self.network.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None, "progress": progress,
        })
        self.notify("on_checkpoint", st.batches_total)

    def describe_checkpoint(self) -> str:
        try:
            p = read_checkpoint(self.ckpt)["progress"] if self.info.is_main else dict(self.last_checkpoint)
        except (RunError, KeyError, TypeError):
            return "none readable"
        if not p:
            return "none readable"
        if p["batch"]:
            return f"from epoch {p['epoch_done'] + 1}, batch {p['batch']}"
        return f"from the end of epoch {p['epoch_done']}" if p["epoch_done"] else "from before the first batch"

    def diverged(self, epoch: int, b: int, problem: str, growth: bool) -> RunError:
        lr = self.optimizer.param_groups[0]["lr"]
        names = self.t.setting_names
        hint = (f", or raise {names['divergence_factor']} (now {self.t.divergence_factor:g}) if such "
                "growth is intended" if growth else "")
        return everywhere(self.info, RunError(
            f"the run diverged in epoch {epoch}, batch {b}: {problem}; it was stopped and the last "
            f"good checkpoint ({self.describe_checkpoint()}) is kept in {self.ckpt}; lower "
            f"{names['lr']} (now {lr:g}){hint}"))

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> dict:
        t, info = self.t, self.info
        self.start()
        st = self.st
        if self.payload is None:
            self.checkpoint()  # the initial state: a resume point and a last good checkpoint from the start
        self.run_dir.started()  # from here on the run's files are kept, whatever happens
        if self.payload is not None and st.epoch_done >= t.epochs and st.batch == 0:
            self.log(f"the run in {t.out} is already complete ({st.epoch_done} epochs)")
        while st.epoch_done < t.epochs:
            self.train_epoch(st.epoch_done + 1)
        if t.epochs == 0 and self.payload is None:
            self.test_eval(0)
            self.checkpoint()
        self.sync.consensus()
        tested = self.test_batches is not None  # without test batches there are no test figures
        summary = {
            "test_accuracy": {f"layer{i + 1}": a for i, a in enumerate(st.test_accuracy)} if tested else None,
            "test_loss": {f"layer{i + 1}": l for i, l in enumerate(st.test_loss)} if tested else None,
            "last_layer_test_accuracy": st.test_accuracy[-1] if tested else None,
            "epochs": t.epochs,
            "batches": st.batches_total,
            "samples_seen": st.samples,
            "resumes": st.resumes,
            "wall_time_s": self.now_s(),
            "device": str(self.device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "precision": getattr(t.rule, "precision", "fp32"),  # the rule's, resolved (model.precision)
        }
        if info.enabled:
            summary["distributed"] = self.sync.stats()  # process 0's view of the synchronisation
        if not info.is_main:
            return summary
        (t.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self.metrics.flush()
        self.notify("on_end", summary, self.network)
        return summary

    def train_epoch(self, epoch: int) -> None:
        t, info, st = self.t, self.info, self.st
        resuming_at = st.batch
        if resuming_at:
            rng = rng_states(self.device)  # the checkpoint's, restored after the skip
        else:
            st.reset_epoch()
        total = len(self.train_batches) if hasattr(self.train_batches, "__len__") else None
        self.network.train()
        bar = tqdm(total=total, initial=st.batch, desc=f"epoch {epoch}/{t.epochs}", unit="batch",
                   disable=not (t.progress and info.is_main), leave=False, dynamic_ncols=True)
        try:
            b = 0
            for b, batch, last in _with_last(self.epoch_batches(epoch)):
                if b <= resuming_at:
                    if b == resuming_at:  # the next batches are drawn as they were the first time
                        set_rng_states(rng, self.device)
                    if last:
                        raise RunError(
                            f"the training batches of epoch {epoch} number {b}, but the checkpoint was "
                            f"written after batch {resuming_at} of it and before the epoch's end: the "
                            "data changed")
                    continue
                self.train_batch(epoch, b, batch, last, bar)
        finally:
            bar.close()
        self.end_epoch(epoch)

    def train_batch(self, epoch: int, b: int, batch, last: bool, bar) -> None:
        t, st = self.t, self.st
        where = f"epoch {epoch}, batch {b}"
        x, y = self.unpack(batch, where)
        x, y, weight = self.share(x, y)
        self.sync.weight = weight
        steps_before = self.sync.steps
        res = self.train_step(x, y, st.batches_total == 0 or b == 1, where)
        norms = self.guard.norms(self.network)
        if self.info.enabled and self.sync.steps == steps_before:  # the processes would drift apart unnoticed
            raise everywhere(self.info, RunError(
                f"the rule {type(t.rule).__name__} changed the weights without calling optimizer.step(), "
                "whose hooks keep the processes in step, so it cannot train on several processes"))
        sums = self.batch_sums(res, y, weight)
        losses = sums.loss.tolist()
        problem = nonfinite_problem(sums.loss, self.network)
        growth = None if problem else (self.guard.weight_problem(norms) or self.guard.loss_problem(losses))
        problem = problem or growth or sums.elsewhere
        if problem is not None:
            raise self.diverged(epoch, b, problem, growth is not None)
        self.guard.accept(losses, norms)
        st.correct += sums.correct
        st.loss_sum += sums.loss_sum
        st.rate_sum += sums.rate_sum
        st.seen += sums.samples
        st.batch = b
        st.batches_total += 1
        st.samples += sums.samples
        bar.update(1)
        bar.set_postfix(acc=f"{(st.correct[-1] / max(st.seen, 1)).item():.3f}", loss=f"{losses[-1]:.4f}")
        rates = (sums.rate_sum / max(sums.samples, 1)).tolist()
        self.stats = res.stats
        self.notify("on_batch", BatchMetrics(epoch, b, st.batches_total, losses, rates,
                                             self.optimizer.param_groups[0]["lr"]))
        if last:
            return  # the end of the epoch evaluates and checkpoints
        if t.eval_every and st.batches_total % t.eval_every == 0:
            self.test_eval(epoch)
        if t.checkpoint_every and st.batches_total % t.checkpoint_every == 0:
            self.checkpoint()

    def end_epoch(self, epoch: int) -> None:
        t, st = self.t, self.st
        if t.scheduler is not None:
            t.scheduler.step()
        seen = max(st.seen, 1)
        train_acc = (st.correct / seen).tolist()
        train_loss = (st.loss_sum / seen).tolist()
        train_rates = (st.rate_sum / seen).tolist()
        self.record(epoch, "train", train_acc, train_loss, train_rates, mean_stats(self.stats, self.info))
        self.test_eval(epoch)
        st.epoch_done, st.batch = epoch, 0
        self.notify("on_epoch", epoch, st.batches_total, self.network)
        test = (" | test acc " + " ".join(f"L{i + 1} {a:.3f}" for i, a in enumerate(st.test_accuracy))
                if self.test_batches is not None else "")
        self.log(f"epoch {epoch}: train acc " + " ".join(f"L{i + 1} {a:.3f}" for i, a in enumerate(train_acc))
                 + test + f" | {self.now_s():.0f} s")
        self.checkpoint()


# --- helpers ---------------------------------------------------------------------------------------


class _BatchSums(NamedTuple):
    """One training batch's figures, summed over its samples (over all processes)."""

    correct: Tensor  # (L,) correctly voted samples
    loss_sum: Tensor  # (L,) loss times samples
    rate_sum: Tensor  # (L,) float64, firing rate times samples
    loss: Tensor  # (L,) mean loss of the batch
    samples: int
    elsewhere: str | None = None  # a problem another process found


def _with_last(items: Iterable) -> Iterator[tuple[int, Any, bool]]:
    """``(index from 1, item, whether it is the last)`` (one item of look-ahead)."""
    it = iter(items)
    try:
        current = next(it)
    except StopIteration:
        return
    b = 1
    for following in it:
        yield b, current, False
        current, b = following, b + 1
    yield b, current, True


def _silent(message: str) -> None:
    """The log of every process but process 0."""


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _short(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        items = list(value)
        return repr(items) if len(items) <= 12 else repr(items[:12])[:-1] + ", ...]"
    return repr(value)
