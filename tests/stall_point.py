"""Helper of the tests that stop a trainer mid-run (resume, distributed, run locks): not a test
module.

Run as a script, ``python tests/stall_point.py WHEN:K:MARKER ARGS...`` is ``threefactor ARGS...``
with one more observer on the trainer: when the run reaches training batch K (counted over the
whole run) it creates MARKER and sleeps, so a test can kill it at a known point. WHEN is
``batch`` (right after batch K, before anything else of it: its end-of-epoch rows, its
checkpoint) or ``test`` (after the test evaluation that follows batch K, its rows written, before
its checkpoint).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve()


def stall_args(when: str, at: int, marker: Path) -> list[str]:
    """The command line prefix that runs ``threefactor`` through this script."""
    return [str(SCRIPT), f"{when}:{at}:{marker}"]


def wait_for_marker(proc: subprocess.Popen, marker: Path, timeout: float = 120.0) -> None:
    """Wait until a trainer started through this script writes ``marker`` (it then sleeps
    there); fail if it ends or times out first."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before the stall point:\n{proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the run never reached the stall point")
        time.sleep(0.02)


def main(argv: list[str]) -> int:
    import threefactor.run.from_config as from_config
    from threefactor.cli import main as threefactor_main
    from threefactor.run.observer import Observer

    when, at, marker = argv[0].split(":", 2)
    at = int(at)

    def stall(batches_done: int) -> None:
        if batches_done == at:
            Path(marker).write_text(f"{batches_done}\n")
            time.sleep(600)

    class Stall(Observer):
        def on_batch(self, m) -> None:
            if when == "batch":
                stall(m.batches_done)

        def on_evaluation(self, m) -> None:
            if when == "test" and m.split == "test":
                stall(m.batches_done)

    train = from_config.train

    def train_with_stall(*args, observers=(), **kwargs):
        return train(*args, observers=[*observers, Stall()], **kwargs)

    from_config.train = train_with_stall  # the CLI imports train when it runs
    return threefactor_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
