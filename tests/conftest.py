"""Shared test setup: one intra-op thread and a fixed seed per test.

The tensors in these tests are tiny: with more than one thread, OpenMP synchronisation
dominates (tens of times slower on a busy 2-core machine), so the suite runs single-threaded.
"""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same global RNG state, whatever ran before it."""
    torch.manual_seed(0)
    yield
