"""Errors of the data layer: one clear sentence each, naming the file and the problem."""

from __future__ import annotations

import os


class DataFileError(ValueError):
    """A data file (events, labels, images) that cannot be read as its format says."""

    def __init__(self, path: str | os.PathLike | None, problem: str) -> None:
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        where = self.path if self.path is not None else "<bytes>"
        super().__init__(f"cannot read {where}: {problem}.")


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
