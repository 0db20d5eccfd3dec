"""Would an exact sparse weight gradient pay, at the density the update really has?

    OMP_NUM_THREADS=1 ./dev run python -m benchmarks.sparse_update [--out benchmarks/results]

DECOLLE's conv update is dW = sum_{b,y,x} g[b,o,y,x] P[b,c,y+i,x+j], with g the post-synaptic
factor (dL/dS sigma'(U), routed through the max-pool). ``update_density`` measures how many
entries of g are non-zero during training (densities are read from its JSON when present).
This times, at that density and on the layers' shapes, the dense weight gradient that autograd
uses (``torch.nn.grad.conv2d_weight``, oneDNN) against the cheapest exact sparse form in plain
PyTorch: im2col of P (``unfold``) times g as a CSR matrix. Writes ``sparse_update.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _harness as H  # noqa: E402


def _median_ms(fn, n: int = 10) -> float:
    fn()
    ts = []
    for _ in range(n):
        c0 = time.process_time()
        fn()
        ts.append(time.process_time() - c0)
    ts.sort()
    return ts[n // 2] * 1e3


def main(argv: list[str] | None = None) -> dict:
    import warnings

    import torch
    import torch.nn.functional as F

    p = argparse.ArgumentParser(prog="python -m benchmarks.sparse_update", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=H.ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    dens = [0.146, 0.104, 0.546]
    src = args.out / "update_density.json"
    if src.exists():
        dens = json.loads(src.read_text())["density"]["factor_nonzero"]
    cases = [  # name, batch, in, out, kernel, map size, density of g
        ("default layer 1", 32, 2, 16, 5, 32, dens[0]),
        ("default layer 2", 32, 16, 32, 5, 16, dens[1]),
        ("default layer 3", 32, 32, 32, 3, 8, dens[2]),
        ("dvsgesture layer 3 (pool 2: at most 25 %)", 8, 128, 128, 7, 16, 0.2),
    ]
    gen = torch.Generator().manual_seed(0)
    rows = []
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    for name, b, cin, cout, k, hw, d in cases:
        P = torch.rand(b, cin, hw, hw, generator=gen)
        g = torch.randn(b, cout, hw, hw, generator=gen) * (torch.rand(b, cout, hw, hw, generator=gen) < d)
        shape = (cout, cin, k, k)

        def dense():
            return torch.nn.grad.conv2d_weight(P, shape, g, padding=k // 2)

        def sparse():
            cols = F.unfold(P, k, padding=k // 2).transpose(1, 2).reshape(-1, cin * k * k)
            gs = g.permute(1, 0, 2, 3).reshape(cout, -1).to_sparse_csr()
            return (gs @ cols).view(shape)

        diff = (sparse() - dense()).abs().max().item()
        row = {"case": name, "batch": b, "in": cin, "out": cout, "kernel": k, "map": hw, "density": d,
               "dense_ms": _median_ms(dense), "sparse_ms": _median_ms(sparse), "max_abs_diff": diff}
        row["sparse_over_dense"] = row["sparse_ms"] / row["dense_ms"]
        rows.append(row)
        print(f"{name}: density {d:.3f}: dense {row['dense_ms']:.2f} ms, sparse {row['sparse_ms']:.2f} ms "
              f"({row['sparse_over_dense']:.1f}x), max |diff| {diff:.1e}")
    data = {"benchmark": "sparse_update", "machine": H.machine_info(torch.get_num_threads()),
            "command": " ".join(["python -m benchmarks.sparse_update", *sys.argv[1:]]), "results": rows}
    H.write_json(args.out / "sparse_update.json", data)
    return data


if __name__ == "__main__":
    main()
