"""The README's Python example runs as printed, and its commands exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_example_runs(capsys, tmp_path, monkeypatch):
    """Ten lines: a DataLoader of the user's own kind into the library's Trainer, which writes
    the run directory of threefactor train."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md has a python example"
    assert len(blocks[0].strip().splitlines()) <= 12
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "{'layer1': " in out and "'layer3': " in out
    run = tmp_path / "runs" / "readme"
    assert {"config.yaml", "metrics.jsonl", "checkpoint.pt", "summary.json"} <= {p.name for p in run.iterdir()}


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./dev test" in readme and "exec ./dev test\n" in ci
