"""Training on several processes: PyTorch's own ``torch.distributed`` under ``torchrun``.

``torchrun --nproc-per-node N -m threefactor train ...`` starts N copies of the same command;
torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) tells each process who it is. Nothing here is a communication layer of its own:
the processes talk through ``torch.distributed`` collectives (gloo on CPU, NCCL on GPU). Without
torchrun (or with ``WORLD_SIZE`` 1) nothing is initialised and every function is a no-op.

What it holds:

- ``DistInfo``: rank, world size and local rank of this process; ``init_from_env`` starts the
  process group when torchrun asks for more than one process (each process on ``cuda:LOCAL_RANK``
  when the run is on CUDA) and ``teardown`` ends it.
- ``Synchroniser``: keeps the processes' models in step through hooks on the optimiser, so the
  learning rules stay untouched. ``exact`` all-reduces the gradients before every optimiser step
  (one flat buffer per step, weighted by each process's share of the batch): the same update as
  one process on the combined batch. ``periodic`` lets each process step on its own shard and
  averages the weights every ``average_every`` optimiser steps (one flat buffer of weights) and
  whenever the trainer needs one model (evaluation, checkpoint, end of the run).
- small collectives for the trainer: ``shard`` (the contiguous share of a batch), ``broadcast_object``,
  ``all_gather_object``, ``all_reduce_sum``, ``broadcast_module``.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from ..errors import DistributedError, RunError

SYNC_MODES: tuple[str, ...] = ("exact", "periodic")


@dataclass(frozen=True)
class DistInfo:
    """Who this process is among the processes of one run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """The process that writes the run directory and logs."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


SINGLE = DistInfo()
_owned_group = False  # True when init_from_env started the process group (and teardown ends it)


def env_info() -> DistInfo:
    """This process's place as torchrun's environment describes it; initialises nothing."""
    names = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    except ValueError:
        raise DistributedError(
            f"the environment variables {', '.join(names)} must be integers (torchrun sets them)"
        ) from None
    if world <= 1:
        return SINGLE
    if not 0 <= rank < world or local < 0:
        raise DistributedError(f"RANK {rank} and LOCAL_RANK {local} do not fit WORLD_SIZE {world}")
    return DistInfo(rank, world, local)


def init_from_env(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the run's process group when torchrun started more than one process.

    Returns this process's ``DistInfo`` and its device: ``cuda:LOCAL_RANK`` for a CUDA run,
    ``device`` otherwise. The backend is NCCL for CUDA, gloo for the CPU. A process group that the
    caller already initialised is used as it is (and left to the caller to end).
    """
    global _owned_group
    info = env_info()
    if not info.enabled:
        return SINGLE, device
    import torch.distributed as dist

    if not dist.is_available():
        raise DistributedError(
            f"WORLD_SIZE is {info.world_size}, but this PyTorch was built without torch.distributed"
        )
    if device.type == "cuda":
        n = torch.cuda.device_count()
        if device.index is not None:
            raise DistributedError(
                f"device {str(device)!r} names one GPU, but under torchrun every process uses "
                "cuda:LOCAL_RANK; set device to cuda or auto"
            )
        if info.local_rank >= n:
            raise DistributedError(
                f"the process with LOCAL_RANK {info.local_rank} has no GPU of its own (this node has "
                f"{n}); start at most {n} processes per node, or train on the cpu"
            )
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (info.rank, info.world_size):
            raise DistributedError("the process group already initialised does not match RANK and WORLD_SIZE")
        return info, device
    if device.type == "cuda" and dist.is_nccl_available():
        backend, kwargs = "nccl", {"device_id": device}
    elif dist.is_gloo_available():
        backend, kwargs = "gloo", {}
    else:
        raise DistributedError("this PyTorch has neither the gloo nor the NCCL backend of torch.distributed")
    try:
        dist.init_process_group(backend, **kwargs)
    except (RuntimeError, ValueError) as err:
        raise DistributedError(f"cannot join the process group ({backend}): {str(err).splitlines()[0]}") from None
    _owned_group = True
    return info, device


def group_ready() -> bool:
    """Whether a process group is initialised already (by ``init_from_env`` or the caller)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def teardown() -> None:
    """End the process group that ``init_from_env`` started (a no-op otherwise)."""
    global _owned_group
    if _owned_group:
        import torch.distributed as dist

        _owned_group = False
        if dist.is_initialized():
            dist.destroy_process_group()


def wait_for_all() -> None:
    """A barrier at the end of a run that succeeded everywhere: without it, a process that
    finishes first can tear its connections down under one still in its last collective, and
    gloo aborts that one at exit."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def rank_seed(seed: int, rank: int, salt: int = 0) -> int:
    """A seed for process ``rank`` of a run seeded ``seed``: distinct per process (dropout masks)."""
    digest = hashlib.sha256(f"threefactor:{seed}:{rank}:{salt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def shard(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[lo, hi)``: the contiguous share of ``n`` items of process ``rank``; the first ``n % world``
    processes get one item more, so the shares differ by at most one (and may be empty)."""
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


# --- collectives for the trainer --------------------------------------------------------------


def _comm_device() -> torch.device:
    """Where tensors must be for the process group's backend (NCCL: this process's GPU)."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Process ``src``'s ``obj`` (picklable) on every process."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list:
    """Every process's ``obj``, in rank order, on every process."""
    import torch.distributed as dist

    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: Tensor) -> Tensor:
    """The sum over the processes of ``t`` (a new tensor on ``t``'s device)."""
    import torch.distributed as dist

    buf = t.detach().to(_comm_device(), copy=True)
    dist.all_reduce(buf)
    return buf.to(t.device)


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Make every process hold process ``src``'s parameters and buffers (the fixed readouts too)."""
    import torch.distributed as dist

    comm = _comm_device()
    for t in [*module.parameters(), *module.buffers()]:
        buf = t.data if t.device == comm else t.data.to(comm)
        dist.broadcast(buf, src=src)
        if buf is not t.data:
            t.data.copy_(buf)


# --- keeping the models in step -------------------------------------------------------------


class Synchroniser:
    """Keeps the processes' copies of the model in step, through hooks on ``optimizer``.

    ``weight`` is this process's number of samples in the current batch; the trainer sets it
    before each batch. In ``exact`` mode the gradients of every optimiser step are replaced by
    sum_r weight_r grad_r / sum_r weight_r over the processes (each process's loss is a mean over
    its own samples, so this is the gradient of the mean over the combined batch). A parameter
    whose gradient is None on every process stays None (the optimiser skips it, as the error
    trigger intends); None on some processes counts as zero there. Gradients, presence mask and
    weight travel as one flat buffer: one all-reduce per optimiser step.

    In ``periodic`` mode no gradient is exchanged: every ``average_every`` optimiser steps the
    weights are averaged over the processes (one flat buffer), and ``consensus()`` averages them
    whenever one model is needed. A process with no sample in a batch (weight 0) does not step.
    The optimiser's own state (e.g. Adamax's moments) stays per process.

    ``collectives``, ``bytes`` and ``seconds`` count what the synchronisation itself exchanged and
    the wall time spent inside its all-reduce calls (measured around each call, with no barrier
    before it: it includes waiting for slower processes).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, info: DistInfo = SINGLE, mode: str = "exact",
                 average_every: int = 50) -> None:
        if mode not in SYNC_MODES:
            raise ValueError(f"unknown sync mode {mode!r}; valid: {', '.join(SYNC_MODES)}")
        if average_every < 1:
            raise ValueError(f"average_every must be >= 1, got {average_every}")
        self.info, self.mode, self.average_every = info, mode, average_every
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        if info.enabled and len({(p.dtype, p.device) for p in self.params}) > 1:
            raise ValueError("the synchroniser needs all parameters of one dtype on one device")
        self.numel = sum(p.numel() for p in self.params)
        self.weight: float = 1.0
        self.steps = 0  # optimiser steps taken
        self.collectives = 0
        self.bytes = 0
        self.seconds = 0.0
        self._since_average = 0
        self._handles: list = []
        if info.enabled:
            pre = self._average_gradients if mode == "exact" else self._skip_when_idle
            self._handles = [optimizer.register_step_pre_hook(pre),
                             optimizer.register_step_post_hook(self._after_step)]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- the collective, timed --

    def _all_reduce(self, buf: Tensor) -> Tensor:
        import torch.distributed as dist

        comm = _comm_device()
        work = buf if buf.device == comm else buf.to(comm)
        if work.is_cuda:
            torch.cuda.synchronize(work.device)  # time the exchange, not the backward before it
        t0 = time.perf_counter()
        dist.all_reduce(work)
        if work.is_cuda:
            torch.cuda.synchronize(work.device)
        self.seconds += time.perf_counter() - t0
        self.collectives += 1
        self.bytes += work.numel() * work.element_size()
        return work if work.device == buf.device else work.to(buf.device)

    # -- exact: gradients every step --

    @torch.no_grad()
    def _average_gradients(self, optimizer, args, kwargs) -> None:
        w = float(self.weight)
        grads = [p.grad for p in self.params]
        ref = self.params[0]
        present = [0.0 if g is None or w == 0 else 1.0 for g in grads]
        flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                          for p, g in zip(self.params, grads)]
                         + [torch.tensor(present + [w], dtype=ref.dtype, device=ref.device)])
        n = self.numel
        if w == 0:
            flat[:n].zero_()
        elif w != 1:
            flat[:n].mul_(w)
        flat = self._all_reduce(flat)
        mean = flat[:n].div_(flat[-1])
        # The mask is read (a device sync on CUDA) only when some gradient here was missing.
        mask = flat[n:-1].tolist() if (w == 0 or any(g is None for g in grads)) else None
        offset = 0
        for i, p in enumerate(self.params):
            k = p.numel()
            p.grad = None if mask is not None and mask[i] == 0 else mean[offset:offset + k].view_as(p)
            offset += k

    # -- periodic: weights every K steps --

    def _skip_when_idle(self, optimizer, args, kwargs) -> None:
        if self.weight == 0:  # no sample of this batch here: no update either
            for p in self.params:
                p.grad = None

    @torch.no_grad()
    def average_parameters(self) -> None:
        """Replace every process's weights by their mean over the processes (one all-reduce)."""
        flat = torch.cat([p.detach().reshape(-1) for p in self.params])
        flat = self._all_reduce(flat).div_(self.info.world_size)
        offset = 0
        for p in self.params:
            k = p.numel()
            p.copy_(flat[offset:offset + k].view_as(p))
            offset += k
        self._since_average = 0

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.steps += 1
        if self.mode == "periodic":
            self._since_average += 1
            if self._since_average >= self.average_every:
                self.average_parameters()

    def consensus(self) -> None:
        """Make the processes' weights equal now (periodic mode, if they stepped since the last
        average; exact mode keeps them equal at every step). Every process must call it."""
        if self.info.enabled and self.mode == "periodic" and self._since_average > 0:
            self.average_parameters()

    def stats(self) -> dict:
        """What the synchronisation cost this process so far."""
        return {
            "processes": self.info.world_size,
            "sync": self.mode,
            "average_every": self.average_every if self.mode == "periodic" else None,
            "optimizer_steps": self.steps,
            "collectives": self.collectives,
            "communicated_mb": self.bytes / 2**20,
            "communication_s": self.seconds,
            "communication_ms_per_step": 1e3 * self.seconds / max(self.steps, 1),
        }


# --- a run's problems and figures on every process ------------------------------------------


def together(info: DistInfo, fn: Callable[[], Any]) -> Any:
    """``fn()`` on this process; under torchrun, a RunError that any process raised is raised on
    every process (the others' copies are marked ``relayed``), so that none waits forever."""
    if not info.enabled:
        return fn()
    try:
        result, error = fn(), None
    except RunError as err:
        result, error = None, err
    messages = all_gather_object(None if error is None else str(error))
    first = next((m for m in messages if m is not None), None)
    if first is None:
        return result
    if error is not None and str(error) == first:
        raise error
    relayed = RunError(first)
    relayed.relayed = True
    raise relayed


def everywhere(info: DistInfo, err: RunError) -> RunError:
    """``err``, which every process raises at once: process 0 reports it, the others keep quiet."""
    err.relayed = info.rank > 0
    return err


def mean_stats(stats: dict | None, info: DistInfo) -> dict | None:
    """A rule's per-layer figures (lists of numbers), averaged over the processes."""
    if not info.enabled or not stats:
        return stats
    keys = sorted(k for k, v in stats.items()
                  if isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v))
    if not keys:
        return stats
    flat = torch.tensor([float(x) for k in keys for x in stats[k]], dtype=torch.float64)
    mean = (all_reduce_sum(flat) / info.world_size).tolist()
    out, i = dict(stats), 0
    for k in keys:
        out[k], i = mean[i:i + len(stats[k])], i + len(stats[k])
    return out
