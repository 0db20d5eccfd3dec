"""The next segments of a stream, made while the current one learns.

``Prefetch(source)`` gives the segments of ``source`` in the same order, made ``depth`` ahead;
an error in the source is raised at the segment where it happened.

A source that can be made apart (``runs_apart(source)``: ``MotionStream``, ``RecordingStream``
and parallel streams of them; not a live camera or a user's callback) is made in a worker
process of torch's ``DataLoader``. In a thread of the learning process, making segments would
compete for Python's interpreter lock with the learner, whose batch-1 step is a few hundred
small operations that each release and take it again: the learner then waits at nearly every
operation (docs/stream.md measures the two designs side by side). Other sources are made in a
background thread.

The worker process keeps the segment-sized buffers it makes apart from its heap
(``SEGMENT_MMAP_THRESHOLD``), so its memory stays flat however long the stream runs; it draws
nothing from the learner's random streams and exits when the learner's process is gone.
"""

from __future__ import annotations

import pickle
import queue
import sys
import threading
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

from ..run.allocator import retain_freed_memory
from .sources import Segment

# Allocations from this size up never grow the heap: where no free chunk of it fits, they get a
# mapping of their own, unmapped when freed. A segment's buffers (its sampling grid and video,
# its events, its frames) have sizes that follow its length; left on the heap among what
# outlives a segment, segments of every length fragment it and the peak creeps up with the
# length of the run.
SEGMENT_MMAP_THRESHOLD = 64 * 1024


def runs_apart(source: object) -> bool:
    """Whether ``source`` can be made in another process: it says so (``runs_apart``), and a
    process can be forked here (Linux)."""
    return bool(getattr(source, "runs_apart", False)) and sys.platform.startswith("linux")


class Prefetch:
    """The segments of ``source``, made ``depth`` ahead (see the module's docstring)."""

    def __init__(self, source: Iterator[Segment], depth: int = 2) -> None:
        self.apart = runs_apart(source)
        self._made = _InProcess(source, depth) if self.apart else _InThread(source, depth)

    def __iter__(self) -> "Prefetch":
        return self

    def __next__(self) -> Segment:
        return next(self._made)

    def close(self) -> None:
        """Stop making segments (the worker process or thread ends)."""
        self._made.close()


class _Raised:
    """An exception of the source, carried to the learner as an item of the stream."""

    def __init__(self, error: BaseException) -> None:
        try:
            pickle.loads(pickle.dumps(error))
        except Exception:  # noqa: BLE001 - an error that cannot cross processes keeps its message
            error = RuntimeError(f"{type(error).__name__}: {error}")
        self.error = error


class _Segments(IterableDataset):
    def __init__(self, source: Iterator[Segment]) -> None:
        self.source = source

    def __iter__(self):
        try:
            yield from self.source
        except Exception as err:  # noqa: BLE001 - raised in the learner's process
            yield _Raised(err)


def _worker_setup(_worker_id: int) -> None:
    retain_freed_memory(mmap_threshold=SEGMENT_MMAP_THRESHOLD)


class _InProcess:
    def __init__(self, source: Iterator[Segment], depth: int) -> None:
        loader = DataLoader(_Segments(source), batch_size=None, num_workers=1, prefetch_factor=depth,
                            multiprocessing_context="fork", worker_init_fn=_worker_setup,
                            generator=torch.Generator())  # its seed is not drawn from the learner's stream
        self.batches = iter(loader)

    def __next__(self) -> Segment:
        if self.batches is None:
            raise StopIteration
        item = next(self.batches)
        if isinstance(item, _Raised):
            self.close()
            raise item.error
        return item

    def close(self) -> None:
        self.batches = None  # the DataLoader's iterator shuts its worker down when it goes


class _InThread:
    _END = object()

    def __init__(self, source: Iterator[Segment], depth: int) -> None:
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._fill, args=(source,), daemon=True)
        self.thread.start()

    def _fill(self, source: Iterator[Segment]) -> None:
        try:
            for segment in source:
                if not self._put(segment):
                    return
            item = self._END
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            item = err
        self._put(item)

    def _put(self, item: object) -> bool:
        """Hand ``item`` to the consumer; False once it has stopped listening."""
        while not self.stopping.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __next__(self) -> Segment:
        item = self.queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
