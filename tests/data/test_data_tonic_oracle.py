"""Our N-MNIST reader against Tonic's own (``tonic.io.read_mnist_file``) on every real recording.

Tonic is a test-only oracle (GPL, heavy): ``./dev test`` installs it with ``--no-deps`` from
tests/oracles.txt, and only its ``io`` module, which needs nothing but numpy, is loaded (by
path, so that the package's other imports are never needed). Without it the test skips, and
under CI=true a skip fails (tests/conftest.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from threefactor.data.formats.nmnist_bin import read_bin

ROOT = Path(__file__).resolve().parents[3] / "shared" / "data" / "nmnist-small"

pytestmark = pytest.mark.oracle


@pytest.fixture(scope="module")
def tonic_io():
    spec = importlib.util.find_spec("tonic")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("Tonic is not installed; `./dev test` installs it from tests/oracles.txt")
    io_spec = importlib.util.spec_from_file_location(
        "tonic_io_oracle", Path(list(spec.submodule_search_locations)[0]) / "io.py")
    module = importlib.util.module_from_spec(io_spec)
    io_spec.loader.exec_module(module)
    return module


@pytest.mark.shared_data
def test_every_real_nmnist_recording_reads_as_tonic_reads_it(tonic_io):
    if not ROOT.is_dir():
        pytest.skip(f"{ROOT} is absent (real N-MNIST recordings, ../shared/data)")
    files = sorted(ROOT.glob("*/*/*.bin"))
    assert len(files) == 1100
    dtype = np.dtype([("x", int), ("y", int), ("t", int), ("p", int)])  # Tonic's NMNIST.dtype
    for path in files:
        assert_same_events(read_bin(path), tonic_io.read_mnist_file(str(path), dtype=dtype), path)


def assert_same_events(ours, theirs, where) -> None:
    assert len(ours) == len(theirs), where
    for field in "xytp":
        assert np.array_equal(ours[field].astype(np.int64), theirs[field]), f"{where}: {field}"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 33), st.integers(0, 33), st.integers(0, 2**23 - 1),
                          st.integers(0, 1), st.booleans()), max_size=40))
def test_overflow_markers_read_as_tonic_reads_them(tonic_io, tmp_path_factory, records):
    """Records with y = 240 are timestamp-overflow markers: every later event gets 2^13 us more."""
    times = sorted(t for _, _, t, _, _ in records)  # recordings are in time order
    raw = bytearray()
    for (x, y, _, p, marker), t in zip(records, times):
        word = (p << 23) | t
        raw += bytes([x, 240 if marker else y, word >> 16, (word >> 8) & 0xFF, word & 0xFF])
    path = tmp_path_factory.mktemp("bin") / "r.bin"
    path.write_bytes(bytes(raw))
    dtype = np.dtype([("x", int), ("y", int), ("t", int), ("p", int)])
    assert_same_events(read_bin(path), tonic_io.read_mnist_file(str(path), dtype=dtype), records)
