"""Fetching and unpacking the official dataset archives, with checksums and atomic extraction.

A download goes to ``<file>.part`` and is renamed into place only once its checksum matches,
so an interrupted or corrupted download never looks like a finished one. An archive is
unpacked into a temporary folder beside its destination and each top-level entry is then
moved in with one rename, so a dataset folder is either complete or absent.
"""

from __future__ import annotations

import gzip
import http.client
import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import DownloadError

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Resource:
    """One official archive: where it is, the file name to keep it under, and its checksum."""

    url: str
    filename: str
    md5: str | None = None
    sha256: str | None = None


def file_digest(path: str | os.PathLike, algorithm: str) -> str:
    h = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def check_integrity(path: str | os.PathLike, md5: str | None = None, sha256: str | None = None) -> bool:
    """True when ``path`` exists and matches every checksum given (no checksum: exists)."""
    if not os.path.isfile(path):
        return False
    if md5 is not None and file_digest(path, "md5") != md5.lower():
        return False
    if sha256 is not None and file_digest(path, "sha256") != sha256.lower():
        return False
    return True


def download_url(
    url: str,
    dest: str | os.PathLike,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest`` with a tqdm progress bar; verify md5/sha256 before keeping it.

    A file already at ``dest`` with matching checksums is kept as it is (no request is made).
    """
    from tqdm.auto import tqdm

    dest = Path(dest)
    if (md5 or sha256) and check_integrity(dest, md5, sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    hashes = {name: hashlib.new(name, usedforsecurity=False)
              for name, want in (("md5", md5), ("sha256", sha256)) if want}
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "threefactor-downloader"})
        with urllib.request.urlopen(request, timeout=timeout) as response, open(part, "wb") as out:
            total = response.headers.get("Content-Length")
            with tqdm(total=int(total) if total and total.isdigit() else None, unit="B",
                      unit_scale=True, unit_divisor=1024, desc=dest.name, disable=not progress) as bar:
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    out.write(chunk)
                    for h in hashes.values():
                        h.update(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        part.unlink(missing_ok=True)
        raise DownloadError(f"downloading {url} to {dest} failed: {exc}") from exc
    for name, h in hashes.items():
        want = (md5 if name == "md5" else sha256).lower()
        if h.hexdigest() != want:
            part.unlink(missing_ok=True)
            raise DownloadError(
                f"the {name} checksum of {url} is {h.hexdigest()}, expected {want}, so the "
                f"download was discarded (retry, or fetch it by hand to {dest})"
            )
    os.replace(part, dest)
    return dest


def _inside(base: Path, name: str) -> bool:
    target = (base / name).resolve()
    return target == base or base in target.parents


def extract_archive(archive: str | os.PathLike, dest_dir: str | os.PathLike) -> list[Path]:
    """Unpack a .zip, .tar(.gz|.bz2|.xz) or single-file .gz into ``dest_dir``, atomically per
    top-level entry; entries already present in ``dest_dir`` are left untouched.

    Returns the top-level paths in ``dest_dir`` that the archive holds.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest_dir))
    base = tmp.resolve()
    try:
        try:
            if zipfile.is_zipfile(archive):
                with zipfile.ZipFile(archive) as zf:
                    for name in zf.namelist():
                        if not _inside(base, name):
                            raise DownloadError(f"{archive} holds a path outside its folder: {name!r}")
                    zf.extractall(tmp)
            elif tarfile.is_tarfile(archive):
                with tarfile.open(archive) as tf:
                    # The "data" filter refuses absolute paths, links out of the folder and devices.
                    tf.extractall(tmp, filter="data")
            elif archive.name.endswith(".gz"):
                with gzip.open(archive, "rb") as src, open(tmp / archive.name[:-3], "wb") as out:
                    shutil.copyfileobj(src, out, _CHUNK)
            else:
                raise DownloadError(f"{archive} is not a zip, tar or gzip archive")
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, gzip.BadGzipFile, OSError) as exc:
            if isinstance(exc, DownloadError):
                raise
            raise DownloadError(f"{archive} could not be unpacked ({exc}); delete it and download again") from exc
        # macOS zips carry resource forks that are not part of the data.
        shutil.rmtree(tmp / "__MACOSX", ignore_errors=True)
        entries = sorted(tmp.iterdir())
        for entry in entries:
            target = dest_dir / entry.name
            if not target.exists():
                os.replace(entry, target)
        return [dest_dir / e.name for e in entries]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download_and_extract(
    resource: Resource, root: str | os.PathLike, *, progress: bool = True
) -> list[Path]:
    """Fetch ``resource`` into ``root`` (verified) and unpack it there; the archive is kept."""
    archive = download_url(resource.url, Path(root) / resource.filename, md5=resource.md5,
                           sha256=resource.sha256, progress=progress)
    return extract_archive(archive, root)
