"""How closely threefactor follows the authors' own code: the measured differences behind the
assertions of tests/test_decolle_public.py (which bound them), for every case it covers.

    python -m benchmarks.fidelity [--out benchmarks/results/fidelity.json]

Needs the authors' package (``pip install --no-deps decolle==0.2``; ``./dev test`` installs it).
Prints a Markdown table and writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _oracle_tests():
    """The test module, whose helpers run both implementations side by side."""
    spec = importlib.util.spec_from_file_location("test_decolle_public", ROOT / "tests" / "test_decolle_public.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fidelity.json"))
    args = ap.parse_args(argv)
    try:
        import decolle.init_functions
        import decolle.utils  # noqa: F401
    except Exception as err:  # noqa: BLE001
        print(f"the authors' package is not importable ({err}); pip install --no-deps decolle==0.2",
              file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(1)
    t = _oracle_tests()
    rows = []
    for name in t.NETS:
        worst, rate = t.state_difference(decolle, name)
        row = {"net": name, "spike_rate": rate, "states_per_step": worst}
        for closed_form, path in ((True, "closed_form"), (False, "autograd")):
            row[f"gradient_{path}"] = t.gradient_difference(decolle, name, closed_form)
            row[f"adamax20_{path}"] = t.adamax_difference(decolle, name, closed_form)
        rows.append(row)
    zero, _ = t.state_difference(decolle, "pooled", zero_bias=True)
    print("| network | spike rate | P, Q, R, U, Y per step (30 steps) | dW, db one step: closed form / autograd "
          "(relative) | W, b after 20 Adamax steps: closed form / autograd |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['net']} | {r['spike_rate']:.3f} | {r['states_per_step']:.1e} | "
              f"{r['gradient_closed_form']:.1e} / {r['gradient_autograd']:.1e} | "
              f"{r['adamax20_closed_form']:.1e} / {r['adamax20_autograd']:.1e} |")
    print(f"\nspikes equal at every step in every case; pooled stack with zero biases (U = 0 exactly "
          f"at the start): states differ by {zero:.1e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "zero_bias_states": zero}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
