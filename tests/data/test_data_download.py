"""download=True against archives served from a local http.server on 127.0.0.1 (no other network)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import tarfile
import threading
import zipfile

import numpy as np
import pytest

from threefactor.data.download import Resource, check_integrity, download_url, extract_archive
from threefactor.errors import DatasetNotFoundError, DownloadError
from threefactor.data.events import make_events
from threefactor.data.datasets.dvs_gesture import DVSGesture
from threefactor.data.datasets.nmnist import NMNIST
from threefactor.data.formats import npy_events
from threefactor.data.formats.nmnist_bin import encode_bin


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture()
def server(tmp_path, monkeypatch):
    """(folder served, base url); proxies are switched off so 127.0.0.1 is reached directly."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    served = tmp_path / "served"
    served.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def _nmnist_zip(path, per_digit=2):
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as zf:
        for d in range(10):
            for k in range(per_digit):
                n = 100
                ev = make_events(rng.integers(0, 34, n), rng.integers(0, 34, n), np.sort(rng.integers(0, 10**5, n)),
                                 rng.integers(0, 2, n))
                zf.writestr(f"Train/{d}/{d * 100 + k:05d}.bin", encode_bin(ev))
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_nmnist_download_from_local_server(server, tmp_path, monkeypatch):
    served, url = server
    md5 = _nmnist_zip(served / "train.zip")
    monkeypatch.setitem(NMNIST.resources, "train", Resource(f"{url}/train.zip", "train.zip", md5=md5))
    root = tmp_path / "data"
    ds = NMNIST(root, "train", download=True)
    assert len(ds) == 20 and np.bincount(ds.targets).tolist() == [2] * 10
    assert check_integrity(root / "train.zip", md5=md5)
    assert not list(root.glob(".extract-*")) and not list(root.glob("*.part"))
    # Present now: no second download (the served archive is gone).
    (served / "train.zip").unlink()
    assert len(NMNIST(root, "train", download=True)) == 20


def test_checksum_mismatch_leaves_nothing(server, tmp_path, monkeypatch):
    served, url = server
    _nmnist_zip(served / "train.zip")
    monkeypatch.setitem(NMNIST.resources, "train", Resource(f"{url}/train.zip", "train.zip", md5="0" * 32))
    root = tmp_path / "data"
    with pytest.raises(DownloadError, match="checksum"):
        NMNIST(root, "train", download=True)
    assert sorted(p.name for p in root.iterdir()) == []
    with pytest.raises(DatasetNotFoundError, match="download=True"):
        NMNIST(root, "train")


def test_sha256_and_http_errors(server, tmp_path):
    served, url = server
    (served / "f.bin").write_bytes(b"hello" * 1000)
    sha = hashlib.sha256(b"hello" * 1000).hexdigest()
    out = download_url(f"{url}/f.bin", tmp_path / "f.bin", sha256=sha, progress=False)
    assert out.read_bytes() == b"hello" * 1000
    with pytest.raises(DownloadError, match="missing.bin"):
        download_url(f"{url}/missing.bin", tmp_path / "m.bin", progress=False)
    assert not (tmp_path / "m.bin.part").exists()


def test_dvsgesture_npy_download(server, tmp_path, monkeypatch):
    served, url = server
    src = tmp_path / "src"
    rng = np.random.default_rng(1)
    for label in range(11):
        d = src / "ibmGestureTest" / "user24_led"
        d.mkdir(parents=True, exist_ok=True)
        ev = make_events(rng.integers(0, 128, 30), rng.integers(0, 128, 30), np.sort(rng.integers(0, 10**6, 30)) // 1000 * 1000,
                         rng.integers(0, 2, 30))
        npy_events.write_gesture_npy(d / f"{label}.npy", ev)
    with tarfile.open(served / "ibmGestureTest.tar.gz", "w:gz") as tf:
        tf.add(src / "ibmGestureTest", arcname="ibmGestureTest")
    md5 = hashlib.md5((served / "ibmGestureTest.tar.gz").read_bytes()).hexdigest()
    monkeypatch.setitem(DVSGesture.resources, "test",
                        Resource(f"{url}/ibmGestureTest.tar.gz", "ibmGestureTest.tar.gz", md5=md5))
    ds = DVSGesture(tmp_path / "data", "test", download=True)
    assert len(ds) == 11 and ds.targets.tolist() == list(range(11))


def test_extract_refuses_paths_outside(tmp_path):
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("../evil.txt", "x")
    with pytest.raises(DownloadError, match="outside"):
        extract_archive(bad, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"not an archive")
    with pytest.raises(DownloadError):
        extract_archive(junk, tmp_path / "out2")
