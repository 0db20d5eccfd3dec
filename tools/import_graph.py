"""The import graph of a package, read from its source with ``ast`` (nothing is imported).

    python tools/import_graph.py [src/threefactor] [--edges]

Prints every module with its size in lines and the package modules it imports (at module level
or inside functions alike), then the import cycles (strongly connected components of more
than one module, or a module importing itself) and every name imported from another module
that the other module marks private (a leading underscore). Exits 1 when there is a cycle or a
private import, so it can gate CI.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Module:
    name: str
    path: Path
    lines: int
    imports: set[str] = field(default_factory=set)
    private: list[str] = field(default_factory=list)  # "name (line N)" of private names taken


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(current: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute module name of ``from <level dots><target> import ...`` in ``current``."""
    if level == 0:
        return target or ""
    base = current.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def read_package(root: Path) -> dict[str, Module]:
    modules: dict[str, Module] = {}
    sources = sorted(root.rglob("*.py"))
    names = {module_name(root, p) for p in sources}
    for path in sources:
        name = module_name(root, path)
        text = path.read_text()
        mod = Module(name, path, text.count("\n"))
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in names:
                        mod.imports.add(alias.name)
            elif isinstance(node, ast.ImportFrom):
                base = resolve(name, is_package, node.level, node.module)
                if base not in names:
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in names:  # "from . import plots" imports the module plots
                        mod.imports.add(sub)
                    else:
                        mod.imports.add(base)
                        if alias.name.startswith("_") and not alias.name.startswith("__"):
                            mod.private.append(f"{base}.{alias.name} (line {node.lineno})")
        mod.imports.discard(name)
        modules[name] = mod
    # A package's __init__ importing its own submodules is not a cycle with them: the
    # submodules importing the package itself is the only edge that matters there.
    return modules


def cycles(modules: dict[str, Module]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(modules[v].imports):
            if w not in modules:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(modules):
        if v not in index:
            visit(v)
    return found


def package_edges(modules: dict[str, Module]) -> dict[str, set[str]]:
    """Edges between modules, leaving out a package's ``__init__`` re-exporting its own
    submodules (its public face), which is not a dependency of the package's code."""
    edges = {}
    for name, mod in modules.items():
        is_init = mod.path.name == "__init__.py"
        edges[name] = {t for t in mod.imports if not (is_init and t.startswith(name + "."))}
    return edges


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default="src/threefactor")
    parser.add_argument("--edges", action="store_true", help="list each module's imports")
    args = parser.parse_args(argv)
    modules = read_package(Path(args.root).resolve())
    edges = package_edges(modules)
    graph = {n: Module(m.name, m.path, m.lines, edges[n], m.private) for n, m in modules.items()}
    for name in sorted(graph):
        mod = graph[name]
        line = f"{mod.lines:6d}  {name}"
        if args.edges and mod.imports:
            line += "  ->  " + ", ".join(sorted(i.removeprefix(name.split('.')[0] + '.') for i in mod.imports))
        print(line)
    largest = max(graph.values(), key=lambda m: m.lines)
    found = cycles(graph)
    private = [f"{m.name}: {p}" for m in graph.values() for p in m.private]
    print(f"\n{len(graph)} modules; largest: {largest.name} ({largest.lines} lines); "
          f"{sum(len(m.imports) for m in graph.values())} imports between them")
    print(f"cycles: {len(found)}" + "".join(f"\n  {' <-> '.join(c)}" for c in found))
    print(f"private names imported from another module: {len(private)}"
          + "".join(f"\n  {p}" for p in private))
    return 1 if found or private else 0


if __name__ == "__main__":
    sys.exit(main())
