"""Helper of the tests that stop a trainer mid-run (resume, distributed): not a test module."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path


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
