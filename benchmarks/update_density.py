"""How sparse is the post-synaptic factor of the DECOLLE weight update during real training?

    OMP_NUM_THREADS=2 ./dev run python -m benchmarks.update_density [--batches 25]
        [--config FILE|PRESET] [--set key=value ...] [--out benchmarks/results]

The update of a conv layer is dW = sum_{b,y,x} g[b,o,y,x] P[b,c,y+i,x+j] with the post-synaptic
factor g = dL/dS * sigma'(U) routed back through the max-pool to the winning position of each
pool window (Eq. 7). This trains the default configuration (``threefactor train`` with no
arguments: the embedded motion dataset, LSUV init, the default rule, through its autograd path)
for ``--batches`` batches, exactly as the trainer does, and records at every learning step and layer:

- ``surrogate_nonzero``: fraction of neurons (after pooling) with sigma'(U) != 0;
- ``pool_mask``: fraction of pre-pool positions that are the argmax of their window
  (1 / pool^2 without ties; 1 without pooling);
- ``factor_nonzero``: fraction of non-zero entries of g at the synapse's output (pre-pool)
  resolution, i.e. what the weight gradient really multiplies; it also counts the zeros of the
  error dL/dS (dropout into the readout; smooth L1 is saturated, not zero);
- ``position_any``: fraction of (sample, y, x) positions where g is non-zero in any channel;
  ``sample_any``: fraction of samples with any non-zero g in the layer.

Writes ``update_density.json`` and ``update_density.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _harness as H  # noqa: E402


class DensityProbe:
    """Forward hooks on every DecolleLayer and its synapse; gradient hooks on the synapse output."""

    def __init__(self, network, surrogate: str) -> None:
        from threefactor.model.surrogates import surrogate_derivative

        self.sd = lambda u: surrogate_derivative(u, surrogate)
        self.layers = list(network.layers)
        n = len(self.layers)
        self.sums = {k: [0.0] * n for k in ("surrogate_nonzero", "pool_mask", "factor_nonzero",
                                            "position_any", "sample_any")}
        self.steps = [0] * n  # backward passes seen (learning steps)
        self.fwd_steps = [0] * n  # forward passes with autograd (learning steps)
        self.trace: list[list[float]] = [[] for _ in range(n)]  # factor_nonzero per step
        self.active = False
        self.handles = []
        for i, layer in enumerate(self.layers):
            self.handles.append(layer.synapse.register_forward_hook(self._syn_hook(i)))
            self.handles.append(layer.register_forward_hook(self._layer_hook(i)))

    def _syn_hook(self, i: int):
        def hook(module, inputs, out):
            if not (self.active and out.requires_grad):
                return
            self._pre_shape = out.shape

            def grad_hook(g):
                nz = g != 0
                self.sums["factor_nonzero"][i] += nz.float().mean().item()
                self.trace[i].append(nz.float().mean().item())
                self.sums["position_any"][i] += nz.any(1).float().mean().item()  # over channels/units
                self.sums["sample_any"][i] += nz.flatten(1).any(1).float().mean().item()
                self.steps[i] += 1
            out.register_hook(grad_hook)
        return hook

    def _layer_hook(self, i: int):
        def hook(module, inputs, output):
            out = output[0]
            if not (self.active and out.u.requires_grad):  # learning steps only, not the burn-in
                return
            u = out.u.detach()
            nz = (self.sd(u) != 0)
            self.sums["surrogate_nonzero"][i] += nz.float().mean().item()
            pool = module.pool.kernel_size if module.pool is not None else 1
            self.sums["pool_mask"][i] += 1.0 / (pool * pool)
            self.fwd_steps[i] += 1
        return hook

    def result(self) -> dict:
        n = len(self.layers)
        out = {}
        for k, v in self.sums.items():
            count = self.fwd_steps if k in ("surrogate_nonzero", "pool_mask") else self.steps
            out[k] = [v[i] / max(count[i], 1) for i in range(n)]
        out["learning_steps"] = self.steps
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def main(argv: list[str] | None = None) -> dict:
    import torch

    from threefactor.config import load_config, to_dict
    from threefactor.model.init import lsuv_init
    from threefactor.model.network import build_network
    from threefactor.rules import make_rule
    from threefactor.run.from_config import load_data, make_optimizer

    p = argparse.ArgumentParser(prog="python -m benchmarks.update_density", description=__doc__.split("\n\n")[0])
    p.add_argument("--config")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--batches", type=int, default=25, help="training batches to measure (25 = one default epoch)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS)")
    p.add_argument("--out", type=Path, default=H.ROOT / "benchmarks" / "results")
    p.add_argument("--name", default="update_density")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # The probe reads g from autograd's hooks; the closed-form step computes the same g without
    # autograd (tests/test_closed_form.py), so the autograd path is measured.
    cfg = load_config(args.config, [*args.set, "rule.closed_form=false"])
    if cfg.rule.name != "decolle" or cfg.network.neuron_model != "decolle":
        raise SystemExit("update_density measures the DECOLLE rule; use a decolle config")
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    train_data, _ = load_data(cfg)
    network = build_network(cfg.network, train_data.input_shape, len(train_data.classes), cfg.seed)
    if cfg.network.init == "lsuv":
        sample = train_data.frames[: min(64, len(train_data.labels))].float()
        lsuv_init(network, sample, cfg.network.init_target_mean, skip_steps=cfg.rule.burn_in)
    optimizer = make_optimizer(cfg, network)
    rule = make_rule(cfg, network, optimizer)
    probe = DensityProbe(network, cfg.network.surrogate)
    probe.active = True
    gen = torch.Generator().manual_seed(cfg.seed)
    per_batch = []
    done = 0
    network.train()
    while done < args.batches:
        order = torch.randperm(len(train_data.labels), generator=gen)
        for idx in order.split(cfg.train.batch_size):
            x = train_data.frames[idx].float()
            res = rule.train_sequence(x, train_data.labels[idx])
            per_batch.append({"loss": res.loss.tolist(),
                              "factor_nonzero": [t[-1] if t else None for t in probe.trace]})
            done += 1
            print(f"batch {done}/{args.batches}: loss {[round(v, 4) for v in res.loss.tolist()]}",
                  file=sys.stderr, flush=True)
            if done >= args.batches:
                break
    probe.close()
    dens = probe.result()
    shapes = []
    shape = tuple(train_data.input_shape)
    for layer in network.layers:
        shapes.append({"in": list(shape), "pool": layer.pool.kernel_size if layer.pool is not None else 1})
        shape = layer.output_shape(shape)
        shapes[-1]["out"] = list(shape)
    data = {
        "benchmark": "update_density",
        "command": " ".join(["python -m benchmarks.update_density", *sys.argv[1:]]),
        "machine": H.machine_info(torch.get_num_threads()),
        "config": to_dict(cfg),
        "batches": done,
        "layers": shapes,
        "density": dens,
        "factor_nonzero_first_last_batch": [per_batch[0]["factor_nonzero"], per_batch[-1]["factor_nonzero"]],
        "per_batch": per_batch,
        "trace_factor_nonzero": probe.trace,
        "wall_s": time.perf_counter() - t0,
    }
    H.write_json(args.out / f"{args.name}.json", data)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for i, tr in enumerate(probe.trace):
            ax.plot(tr, lw=0.6, label=f"layer {i + 1} (pool {shapes[i]['pool']})")
        ax.set_xlabel("learning step (over all batches)")
        ax.set_ylabel("non-zero fraction of the post-synaptic factor")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        ax.set_title("DECOLLE update density during training (default config)", fontsize=10)
        fig.tight_layout()
        fig.savefig(args.out / f"{args.name}.png", dpi=110)
        plt.close(fig)
    except ImportError:
        pass
    for k in ("surrogate_nonzero", "pool_mask", "factor_nonzero", "position_any", "sample_any"):
        print(f"{k:18s} " + "  ".join(f"L{i + 1} {v:.4f}" for i, v in enumerate(dens[k])))
    return data


if __name__ == "__main__":
    main()
