"""Readers and writers: any bytes give valid events or our own error; round trips are exact."""

from __future__ import annotations

import atexit
import gzip
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from data_helpers import assert_valid_events, events
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from threefactor.data.datasets import mnist
from threefactor.data.formats import aedat, label_csv, mnist_idx, nmnist_bin, npy_events, shd_hdf5
from threefactor.errors import DataFileError, EventFileError
from threefactor.data.events import make_events

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Hypothesis runs many examples per test, so the files go to one folder for the module
# (function-scoped tmp_path would be shared across examples anyway).
_TMP = Path(tempfile.mkdtemp(prefix="threefactor-readers-"))
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)


def _file(data: bytes, name: str) -> Path:
    path = _TMP / name
    path.write_bytes(data)
    return path


def _same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and len(a) == len(b)
    for k in ("x", "y", "t", "p"):
        np.testing.assert_array_equal(a[k], b[k])


# --------------------------------------------------------------------------- N-MNIST .bin

@FAST
@given(st.binary(max_size=400))
def test_nmnist_any_bytes(data):
    try:
        ev = nmnist_bin.decode_bin(data)
    except EventFileError as exc:
        assert "5-byte" in str(exc)
        return
    assert_valid_events(ev)
    assert len(ev) == len(data) // 5 - sum(data[i + 1] == 240 for i in range(0, len(data), 5))


@FAST
@given(events(max_n=80, max_xy=255, max_dt=400_000, exclude_y=240))
def test_nmnist_round_trip(ev):
    data = nmnist_bin.encode_bin(ev)
    _same(nmnist_bin.decode_bin(data), ev)
    n_markers = len(data) // 5 - len(ev)
    assert n_markers == (max(0, -((nmnist_bin.MAX_TIMESTAMP_US - int(ev["t"].max())) // 8192)) if len(ev) else 0)
    path = _file(data, "rt.bin")
    nmnist_bin.write_bin(path, ev)
    _same(nmnist_bin.read_bin(path), ev)


def test_nmnist_overflow_marker_adds_2_pow_13_like_tonic():
    # Two events at ts 5 and 7 with a marker between them: the second gets +8192 us.
    data = bytes([1, 2, 0x80, 0, 5, 0, 240, 0, 0, 0, 3, 4, 0, 0, 7])
    ev = nmnist_bin.decode_bin(data)
    assert ev["t"].tolist() == [5, 7 + 8192]
    assert ev["x"].tolist() == [1, 3] and ev["p"].tolist() == [1, 0]


def test_nmnist_writer_refuses_what_the_format_cannot_hold():
    with pytest.raises(ValueError):
        nmnist_bin.encode_bin(make_events([1], [240], [0], [0]))
    with pytest.raises(ValueError):
        nmnist_bin.encode_bin(make_events([300], [1], [0], [0]))
    with pytest.raises(ValueError):  # a late timestamp far after an early one cannot be undone by markers
        nmnist_bin.encode_bin(make_events([1, 1], [1, 1], [2**24, 0], [0, 0]))


@SLOW
@given(events(max_n=40, max_xy=255, max_dt=300_000, exclude_y=240), st.data())
def test_nmnist_truncated_file(ev, data):
    raw = nmnist_bin.encode_bin(ev)
    cut = data.draw(st.integers(0, len(raw)))
    path = _file(raw[:cut], "cut.bin")
    try:
        out = nmnist_bin.read_bin(path)
    except EventFileError as exc:
        assert str(path) in str(exc) and cut % 5
        return
    assert cut % 5 == 0
    assert_valid_events(out)
    assert len(out) <= len(ev)
    _same(out, ev[:len(out)])  # whole records before the cut read back unchanged


def test_nmnist_error_is_one_sentence_naming_the_file(tmp_path):
    path = tmp_path / "bad.bin"
    path.write_bytes(b"123")
    with pytest.raises(EventFileError) as info:
        nmnist_bin.read_bin(path)
    msg = str(info.value)
    assert str(path) in msg and msg.endswith(".") and msg.count(". ") == 0
    assert isinstance(info.value, ValueError)


# --------------------------------------------------------------------------- AEDAT 3.1

_HEADER = b"#!AER-DAT3.1\r\n#Format: RAW\r\n#!END-HEADER\r\n"


@FAST
@given(st.binary(max_size=300), st.booleans())
def test_aedat_any_bytes(data, with_header):
    if with_header:
        data = _HEADER + data
    try:
        ev = aedat.decode_aedat(data)
    except EventFileError:
        return
    assert_valid_events(ev)


@FAST
@given(events(max_n=80, max_xy=32767, max_dt=2**28), st.integers(1, 50))
def test_aedat_round_trip(ev, packet_size):
    # max_dt = 2^28 over up to 80 events crosses 2^31, so the overflow count is exercised.
    data = aedat.encode_aedat(ev, packet_size)
    _same(aedat.decode_aedat(data), ev)


def test_aedat_round_trip_file_and_overflow(tmp_path):
    ev = make_events([0, 127, 5], [0, 127, 9], [1, 2**31 - 1, 2**31 + 5], [0, 1, 1])
    path = tmp_path / "a.aedat"
    aedat.write_aedat(path, ev)
    _same(aedat.read_aedat(path), ev)


@SLOW
@given(events(max_n=30), st.data())
def test_aedat_truncated(ev, data):
    raw = aedat.encode_aedat(ev, packet_size=7)
    cut = data.draw(st.integers(0, len(raw)))
    path = _file(raw[:cut], "cut.aedat")
    try:
        out = aedat.read_aedat(path)
    except EventFileError as exc:
        assert str(path) in str(exc)
        return
    assert_valid_events(out)
    _same(out, ev[:len(out)])


def test_aedat_skips_other_packets_and_invalid_events():
    ev = make_events([1, 2], [3, 4], [10, 20], [1, 0])
    body = aedat.encode_aedat(ev)[len(b"#!AER-DAT3.1\r\n#Format: RAW\r\n#Source 1: DVS128\r\n#!END-HEADER\r\n"):]
    special = np.zeros(1, dtype=aedat.PACKET_HEADER)
    special["eventType"], special["eventSize"], special["eventTSOffset"] = 0, 8, 4
    special["eventCapacity"] = special["eventNumber"] = 2
    other = special.tobytes() + bytes(16)
    # An invalid polarity event (valid bit 0) in a packet of its own.
    h = np.zeros(1, dtype=aedat.PACKET_HEADER)
    h["eventType"], h["eventSize"], h["eventTSOffset"] = 1, 8, 4
    h["eventCapacity"] = h["eventNumber"] = 1
    invalid = h.tobytes() + np.array([(5 << 17) | (5 << 2), 30], dtype="<u4").tobytes()
    out = aedat.decode_aedat(_HEADER + other + body + invalid)
    _same(out, ev)


def test_aedat_version_2_is_refused_clearly():
    with pytest.raises(EventFileError, match="version"):
        aedat.decode_aedat(b"#!AER-DAT2.0\r\n" + bytes(16))


# --------------------------------------------------------------------------- label csv

@FAST
@given(st.binary(max_size=200))
def test_labels_csv_any_bytes(data):
    path = _file(data, "x_labels.csv")
    try:
        rows = label_csv.read_labels_csv(path)
    except DataFileError:
        return
    assert all(0 <= r["label"] <= 10 and 0 <= r["start"] <= r["end"] for r in rows)


def test_labels_csv_round_trip(tmp_path):
    path = tmp_path / "user01_led_labels.csv"
    label_csv.write_labels_csv(path, [(1, 100, 200), (11, 300, 450)])
    rows = label_csv.read_labels_csv(path)
    assert rows.tolist() == [(0, 100, 200), (10, 300, 450)]


# --------------------------------------------------------------------------- .npy (gesture layout)

@FAST
@given(st.binary(max_size=300), st.booleans())
def test_npy_any_bytes(data, with_magic):
    if with_magic:
        data = b"\x93NUMPY\x01\x00" + data
    path = _file(data, "g.npy")
    try:
        ev = npy_events.read_npy_events(path)
    except EventFileError:
        return
    assert_valid_events(ev)


@FAST
@given(events(max_n=50, max_xy=127, max_dt=5000), st.booleans())
def test_npy_round_trip(ev, whole_ms):
    if whole_ms:
        ev["t"] = ev["t"] // 1000 * 1000
    path = _TMP / "rt.npy"
    npy_events.write_gesture_npy(path, ev)
    arr = np.load(path)
    assert arr.shape == (len(ev), 4)
    if whole_ms:
        assert arr.dtype.kind == "i"
    _same(npy_events.read_npy_events(path), ev)


@SLOW
@given(events(max_n=20), st.data())
def test_npy_truncated(ev, data):
    path = _TMP / "full.npy"
    npy_events.write_gesture_npy(path, ev)
    raw = path.read_bytes()
    cut = data.draw(st.integers(0, len(raw)))
    cut_path = _file(raw[:cut], "cut.npy")
    try:
        out = npy_events.read_npy_events(cut_path)
    except EventFileError:
        return
    assert_valid_events(out)


def test_npy_bad_values_are_refused(tmp_path):
    for bad in (np.array([[1, 2, 3, -5]]), np.array([[1.5, 2, 0, 1]]), np.array([[1, 2, 7, 1]]),
                np.array([[1, 2, 0, np.nan]]), np.zeros((3, 3)), np.array(["a", "b"]),
                np.zeros(2, dtype=[("x", "i2", (2,)), ("y", "i2"), ("t", "i8"), ("p", "i1")]),
                np.zeros((), dtype=[("x", "i2"), ("y", "i2"), ("t", "i8"), ("p", "i1")]),
                np.zeros(2, dtype=[("x", "U3"), ("y", "i2"), ("t", "i8"), ("p", "i1")])):
        path = tmp_path / "bad.npy"
        np.save(path, bad)
        with pytest.raises(EventFileError):
            npy_events.read_npy_events(path)


def test_npy_structured_events(tmp_path):
    ev = make_events([1, 2], [3, 4], [5, 6], [0, 1])
    np.save(tmp_path / "s.npy", ev)
    _same(npy_events.read_npy_events(tmp_path / "s.npy"), ev)


# --------------------------------------------------------------------------- SHD HDF5

@SLOW
@given(st.binary(max_size=300), st.booleans())
def test_shd_any_bytes(data, with_magic):
    if with_magic:
        data = b"\x89HDF\r\n\x1a\n" + data
    path = _file(data, "g.h5")
    try:
        samples, labels = shd_hdf5.read_shd(path)
    except EventFileError as exc:
        assert str(path) in str(exc)
        return
    for ev in samples:
        assert_valid_events(ev)


@SLOW
@given(st.lists(events(max_n=30, max_xy=699, max_dt=20_000), min_size=0, max_size=4))
def test_shd_round_trip(samples):
    for ev in samples:
        ev["y"] = 0
        ev["p"] = 0
    labels = list(range(len(samples)))
    path = _TMP / "rt.h5"
    shd_hdf5.write_shd(path, samples, labels, keys=[f"k{i}" for i in range(20)])
    got, got_labels = shd_hdf5.read_shd(path)
    assert got_labels.tolist() == labels and len(got) == len(samples)
    for a, b in zip(got, samples):
        _same(a, b)


def test_shd_truncated_files_fail_cleanly(tmp_path):
    rng = np.random.default_rng(0)
    samples = [make_events(rng.integers(0, 700, 50), np.zeros(50), np.sort(rng.integers(0, 10**6, 50)),
                           np.zeros(50)) for _ in range(3)]
    full = tmp_path / "full.h5"
    shd_hdf5.write_shd(full, samples, [0, 1, 2])
    raw = full.read_bytes()
    for cut in sorted({0, 8, 100, 512, 1024, 2048, len(raw) // 2, len(raw) - 100, len(raw) - 1}):
        path = tmp_path / f"cut{cut}.h5"
        path.write_bytes(raw[:cut])
        try:
            got, _ = shd_hdf5.read_shd(path)
        except EventFileError as exc:
            assert str(path) in str(exc)
            continue
        for ev in got:
            assert_valid_events(ev)


def test_shd_structure_errors(tmp_path):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("labels", data=np.zeros(2, dtype=np.uint16))
    with pytest.raises(EventFileError, match="spikes/times"):
        shd_hdf5.read_shd(path)


# --------------------------------------------------------------------------- MNIST IDX

@FAST
@given(st.binary(max_size=200), st.booleans())
def test_idx_any_bytes(data, with_magic):
    if with_magic:
        data = b"\x00\x00\x08\x02\x00\x00\x00\x03\x00\x00\x00\x02" + data
    try:
        arr = mnist_idx.decode_idx(data)
    except DataFileError:
        return
    assert isinstance(arr, np.ndarray)


def test_idx_round_trip_gzip(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 8, 3]) + np.asarray(arr.shape, dtype=">u4").tobytes() + arr.tobytes()
    (tmp_path / "a.gz").write_bytes(gzip.compress(raw))
    np.testing.assert_array_equal(mnist_idx.read_idx(tmp_path / "a.gz"), arr)
    (tmp_path / "b.gz").write_bytes(gzip.compress(raw)[:-5])
    with pytest.raises(DataFileError):
        mnist_idx.read_idx(tmp_path / "b.gz")


# --------------------------------------------------------------------------- real recordings

@pytest.mark.shared_data
def test_real_nmnist_recordings(shared_data):
    root = shared_data / "nmnist-small"
    files = sorted(root.glob("*/*/*.bin"))
    assert len(files) == 1100
    counts = []
    polarities = set()
    for f in files:
        ev = nmnist_bin.read_bin(f)
        assert_valid_events(ev)
        assert ev["x"].max() <= 33 and ev["y"].max() <= 33
        assert np.all(np.diff(ev["t"]) >= 0)
        polarities |= set(np.unique(ev["p"]).tolist())
        assert set(np.unique(ev["p"]).tolist()) == {0, 1}
        counts.append(len(ev))
        assert os.path.getsize(f) == 5 * len(ev)  # no overflow markers in these short files
    assert min(counts) == 1069 and max(counts) == 7152 and polarities == {0, 1}


@pytest.mark.shared_data
def test_real_nmnist_write_read_identical_bytes(shared_data, tmp_path):
    for f in sorted((shared_data / "nmnist-small" / "Test").glob("*/*.bin"))[:20]:
        ev = nmnist_bin.read_bin(f)
        nmnist_bin.write_bin(tmp_path / "x.bin", ev)
        assert (tmp_path / "x.bin").read_bytes() == f.read_bytes()


@pytest.mark.shared_data
def test_real_mnist_idx(mnist_dir):
    images, labels = mnist.load_mnist(mnist_dir, "test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))
