"""Where a run is: everything besides the weights and the optimiser that an exact resume needs.

The data order of an epoch is drawn from torch's random stream seeded by ``epoch_seed(seed,
epoch)`` (``Trainer`` draws it when it starts iterating the epoch's batches), so a resumed run
gets the same order by iterating again and skipping the batches it had done; every random
stream the run uses (torch, CUDA, numpy, Python) is saved with the checkpoint and restored
after the skip, so dropout masks and augmentations continue where they were.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

import numpy as np
import torch


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s data order (the same on every process)."""
    digest = hashlib.sha256(f"threefactor-epoch:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def rng_states(device: torch.device) -> dict:
    """Every random stream of this process, as tensors and plain data."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
        "numpy": {"name": str(np_state[0]), "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss},
    }


def set_rng_states(states: dict, device: torch.device) -> None:
    """Back to what ``rng_states`` returned."""
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and device.type == "cuda":
        if len(states["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states["cuda"])
    n = states["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


@dataclass
class Progress:
    """Counters and running sums of a run; ``to_payload``/``from_payload`` for checkpoints."""

    n_layers: int
    epoch_done: int = 0  # completed epochs
    batch: int = 0  # batches completed in the epoch in progress
    batches_total: int = 0
    samples: int = 0
    seen: int = 0  # samples of the epoch in progress
    correct: torch.Tensor = field(default=None)  # type: ignore[assignment]
    loss_sum: torch.Tensor = field(default=None)  # type: ignore[assignment]
    rate_sum: torch.Tensor = field(default=None)  # type: ignore[assignment]
    metrics_bytes: int = 0
    elapsed_s: float = 0.0
    test_accuracy: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    resumes: int = 0

    def __post_init__(self) -> None:
        if self.correct is None:
            self.reset_epoch()
        if not self.test_accuracy:
            self.test_accuracy = [0.0] * self.n_layers
            self.test_loss = [0.0] * self.n_layers

    def reset_epoch(self) -> None:
        self.correct = torch.zeros(self.n_layers)
        self.loss_sum = torch.zeros(self.n_layers)
        self.rate_sum = torch.zeros(self.n_layers, dtype=torch.float64)
        self.seen = 0

    def to_payload(self, device: torch.device) -> dict:
        return {
            "epoch_done": self.epoch_done, "batch": self.batch,
            "batches_total": self.batches_total, "samples": self.samples, "seen": self.seen,
            "correct": self.correct, "loss_sum": self.loss_sum, "rate_sum": self.rate_sum,
            "metrics_bytes": self.metrics_bytes, "elapsed_s": self.elapsed_s,
            "test_accuracy": list(self.test_accuracy), "test_loss": list(self.test_loss),
            "resumes": self.resumes, "rng": rng_states(device),
        }

    @classmethod
    def from_payload(cls, n_layers: int, p: dict) -> "Progress":
        return cls(
            n_layers, p["epoch_done"], p["batch"], p["batches_total"], p["samples"], p["seen"],
            p["correct"], p["loss_sum"], p["rate_sum"], p["metrics_bytes"], p["elapsed_s"],
            list(p["test_accuracy"]), list(p["test_loss"]), p["resumes"],
        )
