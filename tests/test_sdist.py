"""The source distribution carries what its tests need (tests/test_readme.py and others read
files outside the package; test_speed imports the benchmark harness)."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NEEDED = ("tests", "benchmarks", "tools", "examples", "docs")


def test_the_sdist_holds_every_file_the_tests_read(tmp_path):
    if not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout to know which files are tracked")
    tracked = subprocess.run(["git", "ls-files", *NEEDED, "README.md", "dev", "constraints.txt", ".ci/run"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    tracked = [f for f in tracked if not f.startswith("benchmarks/results/") and (ROOT / f).exists()]
    code = ("import sys; from setuptools import build_meta; "
            f"print(build_meta.build_sdist({str(tmp_path)!r}))")
    built = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    archive = tmp_path / built.stdout.strip().splitlines()[-1]
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    missing = sorted(set(tracked) - names)
    assert not missing, f"the sdist lacks {missing[:10]}"
    assert not any(n.startswith("benchmarks/results/") or n.endswith(".pyc") for n in names)
