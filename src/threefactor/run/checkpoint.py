"""Checkpoints: everything a run needs to continue, in one sealed file.

A checkpoint is the zip file ``torch.save`` writes, with the sha256 of all its other bytes in
the zip's comment field (the last bytes of the file): ``torch.load`` still reads it as it is,
and any change to any byte, or a truncation, is caught before anything is unpickled. Loading
never unpickles anything but tensors and plain data (``torch.load(weights_only=True)``).
Files are written atomically (a uniquely named temporary file, fsync, rename).
"""

from __future__ import annotations

import hashlib
import io
import pickle
import stat
from pathlib import Path

import torch

from ..atomic import write_atomic
from ..config import Config, config_from_dict
from ..errors import RunError
from ..model.network import DecolleNetwork, build_network
from .directory import CHECKPOINT_NAME

CHECKPOINT_FORMAT = "threefactor-checkpoint"
CHECKPOINT_VERSION = 3


# A checkpoint is the zip file torch.save writes, with the sha256 of all its other bytes in
# the zip's comment field (the last bytes of the file): torch.load still reads it as it is, and
# any change to any byte, or a truncation, is caught before anything is unpickled.
_SEAL_TAG = b"threefactor-sha256:"
_SEAL_LEN = len(_SEAL_TAG) + 64
_EOCD = b"PK\x05\x06"  # zip end-of-central-directory record (22 bytes + comment)


def _seal(data: bytes) -> bytes:
    if data[-22:-18] != _EOCD or data[-2:] != b"\0\0":
        raise RuntimeError("torch.save wrote a zip layout this version of threefactor does not know")
    comment = _SEAL_TAG + hashlib.sha256(data[:-2]).hexdigest().encode()
    return data[:-2] + len(comment).to_bytes(2, "little") + comment


def _seal_ok(data: bytes) -> bool | None:
    """True: sealed and intact; False: sealed but altered; None: no seal (truncated or foreign)."""
    n = _SEAL_LEN
    if (len(data) < n + 22 or not data[-n:].startswith(_SEAL_TAG)
            or data[-n - 22:-n - 18] != _EOCD or int.from_bytes(data[-n - 2:-n], "little") != n):
        return None
    return hashlib.sha256(data[:-n - 2]).hexdigest().encode() == data[-64:]


def write_checkpoint(path: str | Path, payload: dict) -> None:
    """``payload`` (tensors and plain data), stamped with the format and version, sealed and
    written atomically: a crash never leaves a torn checkpoint."""
    sealed = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **payload}
    buf = io.BytesIO()
    torch.save(sealed, buf)
    write_atomic(Path(path), _seal(buf.getvalue()), fsync=True)


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """The verified payload of a checkpoint file or run directory, or RunError in one sentence."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    return parse_checkpoint(path, checkpoint_bytes(path), map_location)


def checkpoint_bytes(path: Path) -> bytes:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise RunError(f"{path}: no checkpoint there") from None
    except OSError as err:
        raise RunError(f"{path}: cannot read the checkpoint: {err.strerror}") from None
    if not stat.S_ISREG(mode):
        # A device (a link to /dev/zero) or a pipe would be read forever.
        raise RunError(f"{path}: refused, it is {_file_kind(mode)}, not a checkpoint file")
    try:
        return path.read_bytes()
    except OSError as err:
        raise RunError(f"{path}: cannot read the checkpoint: {err.strerror}") from None


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a pipe"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def parse_checkpoint(path: Path, data: bytes, map_location: str | torch.device = "cpu") -> dict:
    """The verified payload of the bytes ``data`` of the checkpoint file ``path``."""
    sealed = _seal_ok(data)
    if sealed is None:
        raise RunError(
            f"{path}: refused, the file is truncated or damaged or was not written by this "
            "threefactor (it does not end with a valid sha256 seal)"
        )
    if not sealed:
        raise RunError(
            f"{path}: refused, its bytes do not match the sha256 sealed into it (the file was "
            "altered or corrupted)"
        )
    try:
        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "weights_only" in str(err):
            raise RunError(
                f"{path}: refused, it holds objects other than tensors and plain data "
                "(threefactor never unpickles arbitrary objects)"
            ) from None
        raise RunError(f"{path}: the checkpoint cannot be read and was refused") from None
    except Exception:  # torch raises many types for corrupt files
        raise RunError(f"{path}: the checkpoint cannot be read and was refused") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise RunError(f"{path}: not a threefactor checkpoint")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise RunError(
            f"{path}: checkpoint format version {payload.get('version')!r} is not the one this "
            f"threefactor reads ({CHECKPOINT_VERSION})"
        )
    return payload


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[DecolleNetwork, Config, dict]:
    """Network, config and raw payload of the checkpoint of a run that ``threefactor train``
    built from a config; never unpickles arbitrary objects. (A run built in Python has no
    config to rebuild its network from: load its ``read_checkpoint(path)["model"]`` into your
    own network.)"""
    import yaml

    payload = read_checkpoint(path, map_location)
    try:
        raw = yaml.safe_load(payload["config"])
    except (KeyError, TypeError, yaml.YAMLError):
        raw = None
    if not isinstance(raw, dict) or "input_shape" not in payload or "classes" not in payload:
        raise RunError(f"{path}: this run was not built from a config (threefactor train), so its network "
                       "cannot be rebuilt here; load read_checkpoint(path)['model'] into your own network")
    try:
        cfg = config_from_dict(raw, source=f"{path} (config)")
        network = build_network(cfg.network, tuple(payload["input_shape"]), len(payload["classes"]), cfg.seed)
        network.load_state_dict(payload["model"])
    except (KeyError, TypeError, ValueError, RuntimeError):
        raise RunError(f"{path}: weights do not match the network its config describes") from None
    return network, cfg, payload
