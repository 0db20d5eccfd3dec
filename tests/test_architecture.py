"""The package's import graph (tools/import_graph.py reads it with ast): no cycles, even through
imports inside functions, and no private name of one module imported by another."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_package_has_no_import_cycle_and_no_private_import(capsys):
    tool = _tool()
    assert tool.main([str(ROOT / "src" / "threefactor")]) == 0, capsys.readouterr().out


def test_the_tool_finds_a_cycle_and_a_private_import(tmp_path, capsys):
    """The check can fail: a two-module cycle through a function-level import, and a private name."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import _hidden\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n_hidden = 1\n")
    tool = _tool()
    assert tool.main([str(pkg)]) == 1
    out = capsys.readouterr().out
    assert "pkg.a <-> pkg.b" in out and "pkg.b._hidden" in out
