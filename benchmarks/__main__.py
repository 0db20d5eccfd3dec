"""`./dev bench`: list the benchmarks (each is run as `python -m benchmarks.<name>`)."""

import pkgutil
import sys

import benchmarks

names = [m.name for m in pkgutil.iter_modules(benchmarks.__path__) if not m.name.startswith("_")]
if len(sys.argv) < 2 or sys.argv[1] not in names:
    print("usage: ./dev bench NAME [options]; benchmarks: " + ", ".join(sorted(names)))
    sys.exit(0 if len(sys.argv) < 2 else 2)
import runpy  # noqa: E402

sys.argv = [f"benchmarks.{sys.argv[1]}", *sys.argv[2:]]
runpy.run_module(sys.argv[0], run_name="__main__")
