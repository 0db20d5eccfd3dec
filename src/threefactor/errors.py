"""Every error threefactor raises on purpose: one clear sentence each, naming the file, key or
value and the problem (never a traceback from deep inside).

They derive from the built-in exception a caller would expect (a bad value is a ValueError, a
missing file a FileNotFoundError), so ``except ValueError`` keeps working."""

from __future__ import annotations

import os


class DataFileError(ValueError):
    """A data file (events, labels, images) that cannot be read as its format says."""

    def __init__(self, path: str | os.PathLike | None, problem: str) -> None:
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        where = self.path if self.path is not None else "<bytes>"
        super().__init__(f"cannot read {where}: {problem}.")

    def __reduce__(self):  # it crosses processes (a stream's segments are made in a worker)
        return type(self), (self.path, self.problem)


class EventFileError(DataFileError):
    """An event file that is truncated, corrupt or not in the format it claims to be."""


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing; the message says where we looked and how to get them."""


class DownloadError(OSError):
    """A download that failed or whose checksum does not match."""


class UnknownClassError(ValueError):
    """A sample whose class is not in the class list a dataset was given (e.g. a test split's
    class that its training split lacks)."""

    def __init__(self, root, label: str, path, classes) -> None:
        self.root, self.label, self.path, self.classes = os.fspath(root), label, os.fspath(path), tuple(classes)
        shown = ", ".join(map(repr, self.classes[:20])) + (", ..." if len(self.classes) > 20 else "")
        super().__init__(
            f"{self.root}: class {label!r} (of {self.path}) is not one of the {len(self.classes)} "
            f"classes it was given ({shown})")

    def __reduce__(self):
        return type(self), (self.root, self.label, self.path, self.classes)


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


class LocalCostError(ValueError):
    """A user cost that is not local, or not a cost, in one sentence."""


class LayerContractError(TypeError):
    """A user's layer that does not keep the step contract forward(x, state) -> (out, state)."""


class RunError(RuntimeError):
    """A problem with the run's inputs or outputs, reported as one sentence."""

    relayed = False  # under torchrun: raised because another process met this problem first


class RunDirectoryError(RuntimeError):
    """A run directory that cannot be used: in use by another run, not writable, not a run."""


class DistributedError(RuntimeError):
    """The distributed environment cannot run this job; one sentence."""


class NIRError(ValueError):
    """A graph, file or network that cannot be exported or imported, in one sentence."""
