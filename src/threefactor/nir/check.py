"""Run a written NIR graph through the importers that are installed, on a run's own test split,
and compare it with the run (``threefactor export RUN OUT.nir --check``).

Importers: ``threefactor`` (:func:`from_nir`), ``norse`` (``norse.torch.from_nir``, portable
graphs of the norse dialect), ``snntorch`` (``snntorch.import_nir.import_from_nir``, portable
graphs of the snntorch dialect) and ``nirtorch`` (exact graphs: nirtorch's generic graph
interpreter ``nir_to_torch``, which wires the graph, sums each node's inputs and gives loop
edges the previous step's value, with :func:`nirtorch_node_map` for the nodes it has no
mapping of). Each runs the test split batched, one step at a time; per layer the spikes are
compared with ours, and the membrane ``U`` (the input of the layer's spiking node) before the
neuron's first spike.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NIRError
from .graph import POOL_KEY, first_layer_number, import_nir, layer_name, meta_value, read_graph, readout_name
from .load import from_nir

if TYPE_CHECKING:  # pragma: no cover
    import nir

__all__ = [
    "IMPORTERS", "ImporterResult", "CheckReport", "check_nir", "nirtorch_node_map", "format_report",
    "with_one_output",
]

IMPORTERS: tuple[str, ...] = ("threefactor", "norse", "snntorch", "nirtorch")
_PACKAGES = {"norse": "norse", "snntorch": "snntorch", "nirtorch": "nirtorch"}


@dataclass
class ImporterResult:
    importer: str
    accuracy: float | None = None  # last layer's readout, majority over the steps after burn-in
    spike_agreement: list[float] = field(default_factory=list)  # per layer, over (sample, step, neuron)
    # per layer: max |U - ours| before either spikes, in samples whose spikes agreed so far
    membrane_diff: list[float] = field(default_factory=list)
    skipped: str = ""  # why this importer did not run


@dataclass
class CheckReport:
    path: str
    mode: str
    dialect: str
    samples: int
    burn_in: int
    ours: float  # our last layer's test accuracy
    results: list[ImporterResult]


# --- nirtorch's interpreter: modules for the NIR nodes it has no mapping of ----------------------


class _LI(nn.Module):
    """NIR LI by forward Euler: x <- x + dt/tau (v_leak - x + r in), passing on the new state."""

    def __init__(self, node, dt: float) -> None:
        super().__init__()
        for name in ("tau", "r", "v_leak"):
            self.register_buffer(name, torch.as_tensor(np.asarray(getattr(node, name)), dtype=torch.float32))
        self.dt = dt

    def forward(self, x, state=None):
        s = torch.zeros_like(x) if state is None else state
        y = s + self.dt / self.tau * (self.v_leak - s + self.r * x)
        return y, y


class _Threshold(nn.Module):
    def __init__(self, node) -> None:
        super().__init__()
        self.register_buffer("threshold", torch.as_tensor(np.asarray(node.threshold), dtype=torch.float32))
        self.at_or_above = meta_value(node.metadata or {}, "comparison", ">") == ">="

    def forward(self, x):
        return (x >= self.threshold if self.at_or_above else x > self.threshold).to(x.dtype)


class _Scale(nn.Module):
    def __init__(self, node) -> None:
        super().__init__()
        self.register_buffer("scale", torch.as_tensor(np.asarray(node.scale), dtype=torch.float32))

    def forward(self, x):
        return x * self.scale


class _Delay(nn.Module):
    """One step of delay (the only delay threefactor writes)."""

    def forward(self, x, state=None):
        return (torch.zeros_like(x) if state is None else state), x


class _Flatten(nn.Module):
    """NIR shapes have no batch axis: start_dim 0 of a sample is dimension 1 of a batch."""

    def __init__(self, node) -> None:
        super().__init__()
        self.start, self.end = int(node.start_dim), int(node.end_dim)

    def forward(self, x):
        return x.flatten(self.start + 1, self.end if self.end < 0 else self.end + 1)


def _affine(node) -> nn.Linear:
    # nirtorch's default mapping leaves the bias as drawn at random
    w = torch.as_tensor(np.asarray(node.weight), dtype=torch.float32)
    m = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        m.weight.copy_(w)
        m.bias.copy_(torch.as_tensor(np.asarray(node.bias), dtype=torch.float32))
    return m


def _sum_pool(node) -> nn.Module:
    k = tuple(int(i) for i in np.asarray(node.kernel_size).reshape(-1))
    s = tuple(int(i) for i in np.asarray(node.stride).reshape(-1))
    if meta_value(node.metadata or {}, POOL_KEY) == "max":  # threefactor's mark: NIR has no max pool
        return nn.MaxPool2d(k, s)
    return nn.LPPool2d(1, k, s)


def nirtorch_node_map(dt: float) -> dict:
    """Mappings for ``nirtorch.nir_to_torch`` of the nodes of an exact graph that nirtorch's
    defaults lack (LI, Threshold, Scale, Delay) or get wrong for batches (Affine's bias,
    Flatten), as NIR defines them and with the graph's stated discretisation. The
    ``threefactor_pool = "max"`` mark of a SumPool2d is read as max pooling: nothing else in
    NIR expresses a max-pooled membrane."""
    nir = import_nir()
    return {
        nir.LI: lambda n: _LI(n, dt),
        nir.Threshold: _Threshold,
        nir.Scale: _Scale,
        nir.Delay: lambda n: _Delay(),
        nir.Affine: _affine,
        nir.Flatten: _Flatten,
        nir.SumPool2d: _sum_pool,
    }


# --- importing ----------------------------------------------------------------------------


def _why_not(importer: str, mode: str, dialect: str) -> str:
    """Why ``importer`` does not apply to a graph of ``mode``/``dialect``; empty when it does."""
    if importer == "threefactor":
        return ""
    if importer != "nirtorch" and importlib.util.find_spec(_PACKAGES[importer]) is None:
        return f"not installed (pip install {_PACKAGES[importer]})"
    if importlib.util.find_spec("nirtorch") is None:
        return "not installed (pip install nirtorch)"
    if importer == "nirtorch":
        return "" if mode == "exact" else "runs exact graphs (the portable ones run in Norse and snnTorch)"
    if mode == "exact":
        return ("cannot import exact graphs (it has no LI, Threshold, Scale or Delay nodes); "
                "export with --mode portable")
    if dialect != importer:
        return f"the graph is for {dialect}'s step; export with --dialect {importer}"
    return ""


def _import(graph, importer: str) -> tuple[nn.Module, Callable[[nn.Module], None]]:
    """The imported module and a function that resets its state before a new batch."""
    import warnings

    dt = float(meta_value(graph.metadata, "dt"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nirtorch's deprecation of the API Norse uses
        if importer == "norse":
            import norse.torch

            return norse.torch.from_nir(graph, dt=dt), lambda m: None
        if importer == "snntorch":
            import contextlib
            import io

            from snntorch.import_nir import import_from_nir

            with contextlib.redirect_stdout(io.StringIO()):  # it prints as it goes
                module = import_from_nir(graph)

            def reset(m: nn.Module) -> None:  # its neurons keep their state in themselves
                for sub in m.modules():
                    if hasattr(sub, "reset_mem"):
                        sub.reset_mem()

            return module, reset
        import nirtorch

        return nirtorch.nir_to_torch(with_one_output(graph), nirtorch_node_map(dt)), lambda m: None


def with_one_output(graph: "nir.NIRGraph") -> "nir.NIRGraph":
    """``graph`` with one Output, the last layer's readout (or its spikes without readouts):
    nirtorch's nir_to_torch never returns on a graph with more. The branches that fed only
    the other outputs go with them."""
    nir = import_nir()
    outputs = [k for k, n in graph.nodes.items() if isinstance(n, nir.Output)]
    if len(outputs) <= 1:
        return graph
    last = readout_name(int(meta_value(graph.metadata, "n_layers")) - 1, first_layer_number(graph))
    drop = set(outputs) - {last if last in outputs else "output"}
    while True:
        succ: dict[str, set] = {k: set() for k in graph.nodes}
        for a, b in graph.edges:
            succ[a].add(b)
        more = {k for k, s in succ.items() if k not in drop and s and s <= drop}
        if not more:
            break
        drop |= more
    nodes = {k: v for k, v in graph.nodes.items() if k not in drop}
    edges = [(a, b) for a, b in graph.edges if a not in drop and b not in drop]
    return nir.NIRGraph(nodes=nodes, edges=edges, metadata=dict(graph.metadata))


# --- the comparison -------------------------------------------------------------------------


class _Taps:
    """Forward hooks on a module's named submodules: their input (the membrane U of a spiking
    node: the sum of its inputs) and output (spikes), one entry per step."""

    def __init__(self, module: nn.Module, names: list[str]) -> None:
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = []
        subs = dict(module.named_modules())
        for name in names:
            if name in subs:
                self.handles.append(subs[name].register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(mod, args, out):
            self.inputs[name] = args[0].detach()
            self.outputs[name] = (out[0] if isinstance(out, tuple) else out).detach()
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _layer_nodes(graph, n_layers: int) -> list[tuple[str, str, int]]:
    """Per layer: the node whose input is U (unpooled when it is the OR of a pool), the node
    whose output is the layer's spikes, and the pool size to take U's max over."""
    out = []
    first = first_layer_number(graph)
    for i in range(n_layers):
        name = layer_name(i, first)
        spike = f"{name}_spike"
        if f"{name}_neurons" in graph.nodes:  # portable: LIF neurons, then the OR of the pool
            k = int(np.asarray(graph.nodes[f"{name}_pool"].kernel_size).reshape(-1)[0])
            out.append((f"{name}_neurons", spike, k))
        elif f"{name}_neurons_spike" in graph.nodes:  # exact, refractory before the pool
            k = int(np.asarray(graph.nodes[f"{name}_pool"].kernel_size).reshape(-1)[0])
            out.append((f"{name}_neurons_spike", spike, k))
        else:
            out.append((spike, spike, 1))
    return out


def _run_ours(network, x: torch.Tensor):
    state, spikes, membranes, scores = None, [], [], []
    with torch.no_grad():
        for t in range(x.shape[1]):
            out, state = network(x[:, t], state)
            spikes.append([s.flatten(1) for s in out.spikes])
            membranes.append([u.flatten(1) for u in out.membranes])
            scores.append(out.readouts[-1])
    return spikes, membranes, torch.stack(scores)


def _votes(scores: torch.Tensor, burn_in: int) -> torch.Tensor:
    """Majority class over the steps after burn-in of (T, B, C) class scores (our vote)."""
    winners = scores[burn_in:].argmax(2)  # (T', B)
    votes = torch.zeros(scores.shape[1], scores.shape[2], dtype=torch.long)
    votes.scatter_add_(1, winners.t(), torch.ones_like(winners.t()))
    return votes.argmax(1)


def check_nir(
    nir_path: str | Path,
    run: str | Path,
    importers: tuple[str, ...] = IMPORTERS,
    max_samples: int | None = None,
    batch_size: int | None = None,
) -> CheckReport:
    """Run the graph in ``nir_path`` with each of ``importers`` on the test split of the run
    ``run`` (a run directory or checkpoint), next to the run's network itself."""
    from ..data.splits import SplitLayout
    from ..errors import RunError
    from ..run.checkpoint import load_checkpoint
    from ..run.from_config import load_split

    graph, label = read_graph(nir_path)
    meta = graph.metadata if isinstance(graph.metadata, dict) else {}
    mode = str(meta_value(meta, "mode", "?"))
    dialect = str(meta_value(meta, "dialect", "?"))
    try:
        network, cfg, payload = load_checkpoint(run)
    except RunError as err:
        raise NIRError(str(err)) from None
    network.eval()
    if int(meta_value(meta, "n_layers", -1)) != len(network.layers):
        raise NIRError(f"{label}: has {meta_value(meta, 'n_layers')} layers, the run {run} has {len(network.layers)}")
    layout = None
    if payload.get("sensor_size") is not None:
        layout = SplitLayout(tuple(payload["classes"]), tuple(payload["sensor_size"]), "the checkpoint")
    try:
        test = load_split(cfg, "test", layout)
    except RunError as err:
        raise NIRError(str(err)) from None
    n = len(test.labels) if max_samples is None else min(max_samples, len(test.labels))
    bs = batch_size or cfg.train.eval_batch_size
    burn_in = cfg.rule.burn_in
    n_layers = len(network.layers)
    taps_at = _layer_nodes(graph, n_layers)
    readout = network.readouts[-1]

    modules: dict[str, Any] = {}
    results = {name: ImporterResult(name) for name in importers}
    for name in importers:
        why = _why_not(name, mode, dialect)
        if why:
            results[name].skipped = why
            continue
        modules[name] = (from_nir(graph), None) if name == "threefactor" else _import(graph, name)
    sums = {name: dict(correct=0, agree=[0.0] * n_layers, count=[0] * n_layers, diff=[0.0] * n_layers)
            for name in modules}
    ours_correct = 0
    for lo in range(0, n, bs):
        hi = min(lo + bs, n)
        x = test.frames[lo:hi].float()
        y = test.labels[lo:hi]
        s_ours, u_ours, scores_ours = _run_ours(network, x)
        ours_correct += int((_votes(scores_ours, burn_in) == y).sum())
        for name, (module, reset) in modules.items():
            acc = sums[name]
            if name == "threefactor":
                s_imp, u_imp, scores = _run_ours(module, x)
            else:
                reset(module)
                s_imp, u_imp, scores = _run_imported(module, x, taps_at, readout)
            acc["correct"] += int((_votes(scores, burn_in) == y).sum())
            # U is compared while neither network has spiked in that unit and while every
            # layer below has spiked alike in that sample: after a spike differs (a float
            # rounding near 0), U differs by the dynamics, which the spike agreement counts
            alike = torch.ones(x.shape[0], x.shape[1], dtype=torch.bool)  # (B, T): layers so far
            for i in range(n_layers):
                quiet = torch.ones_like(s_ours[0][i], dtype=torch.bool)
                for t in range(x.shape[1]):
                    a, b = s_ours[t][i], s_imp[t][i]
                    same = a == b
                    acc["agree"][i] += float(same.float().sum())
                    acc["count"][i] += a.numel()
                    if u_imp[t][i] is not None:
                        mask = quiet & alike[:, t, None]
                        if mask.any():
                            d = (u_imp[t][i] - u_ours[t][i]).abs()[mask]
                            acc["diff"][i] = max(acc["diff"][i], float(d.max()))
                    quiet &= (a == 0) & (b == 0)
                    alike[:, t] &= same.all(1)
                alike = torch.cummin(alike.int(), dim=1).values.bool()  # from the first difference on
    for name, acc in sums.items():
        r = results[name]
        r.accuracy = acc["correct"] / n
        r.spike_agreement = [a / c for a, c in zip(acc["agree"], acc["count"])]
        r.membrane_diff = acc["diff"]
    return CheckReport(str(nir_path), mode, dialect, n, burn_in, ours_correct / n,
                       [results[name] for name in importers])


def _run_imported(module: nn.Module, x: torch.Tensor, taps_at, readout):
    names = sorted({a for a, _, _ in taps_at} | {b for _, b, _ in taps_at})
    taps = _Taps(module, names)
    state, spikes, membranes, scores = None, [], [], []
    try:
        with torch.no_grad():
            for t in range(x.shape[1]):
                out = module(x[:, t], state)
                y, state = out if isinstance(out, tuple) else (out, None)
                step_s, step_u = [], []
                for u_name, s_name, k in taps_at:
                    s = taps.outputs[s_name]
                    u = taps.inputs.get(u_name)
                    if u is not None and k > 1:
                        u = F.max_pool2d(u, k)
                    step_s.append(s.flatten(1))
                    step_u.append(None if u is None else u.flatten(1))
                spikes.append(step_s)
                membranes.append(step_u)
                y = y.flatten(1)
                if y.shape[1] != readout.g.shape[0]:  # a graph without readouts gives spikes
                    y = readout(y)
                scores.append(y)
    finally:
        taps.close()
    return spikes, membranes, torch.stack(scores)


def format_report(report: CheckReport) -> str:
    """The report as a table: accuracy next to ours, spike agreement and membrane difference."""
    lines = [
        f"check of {report.path} ({report.mode} mode, {report.dialect}) on the run's test split: "
        f"{report.samples} samples, majority over the steps after {report.burn_in} of burn-in",
        f"  {'':12s} {'accuracy':>9s}   spike agreement per layer (%)   max |dU| before the first spike per layer",
        f"  {'ours':12s} {100 * report.ours:8.1f}%",
    ]
    for r in report.results:
        if r.skipped:
            lines.append(f"  {r.importer:12s} {'-':>9s}   {r.skipped}")
            continue
        agree = " / ".join(f"{100 * a:.2f}" for a in r.spike_agreement)
        diff = " / ".join(f"{d:.1e}" for d in r.membrane_diff)
        lines.append(f"  {r.importer:12s} {100 * r.accuracy:8.1f}%   {agree:30s}  {diff}")
    return "\n".join(lines)
