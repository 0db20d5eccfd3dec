"""Shared test setup: one intra-op thread and a fixed seed per test.

The tensors in these tests are tiny: with more than one thread, OpenMP synchronisation
dominates (tens of times slower on a busy 2-core machine), so the suite runs single-threaded.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same global RNG state, whatever ran before it."""
    torch.manual_seed(0)
    yield


def wait_for_marker(proc: subprocess.Popen, marker: Path, timeout: float = 120.0) -> None:
    """Wait until a trainer started with a stall hook writes ``marker`` (it then sleeps there);
    fail if it ends or times out first."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before the stall point:\n{proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the run never reached the stall point")
        time.sleep(0.02)
