"""NIR export and import (issue 7): exact round trips, the graph's own semantics, portable mode."""

from __future__ import annotations

import argparse
import math
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

nir = pytest.importorskip("nir", reason="the 'nir' package is not installed")

from threefactor.config import Config, LayerConfig, NetworkConfig, NeuronConfig  # noqa: E402
from threefactor.export import (  # noqa: E402
    NIRApproximationWarning,
    NIRError,
    add_export_arguments,
    export_cli,
    export_nir,
    from_nir,
)
from threefactor.network import DecolleNetwork, build_network  # noqa: E402
from threefactor.neurons import DecolleParams, input_trace_step  # noqa: E402

T = 50  # time steps per simulation
ARCHS = {
    "dense": ([LayerConfig("dense", 12, 1, 1), LayerConfig("dense", 7, 1, 1)], (20,)),
    "conv_pool": ([LayerConfig("conv", 4, 3, 2), LayerConfig("conv", 5, 3, 2)], (2, 12, 12)),
    "conv_dense": ([LayerConfig("conv", 4, 3, 2), LayerConfig("conv", 3, 3, 1),
                    LayerConfig("dense", 6, 1, 1)], (2, 8, 8)),
}


def make_net(arch: str, ordering: str = "current", seed: int = 1, gain: float = 3.0) -> tuple[DecolleNetwork, tuple]:
    layers, shape = ARCHS[arch]
    cfg = NetworkConfig(layers=list(layers), neuron=NeuronConfig(ordering=ordering))
    net = build_network(cfg, shape, 3, seed=seed)
    with torch.no_grad():  # stronger weights so every layer spikes within 50 steps
        for layer in net.layers:
            layer.synapse.weight.mul_(gain)
    return net.eval(), shape


def spikes_in(shape, seed: int = 0, batch: int = 3, rate: float = 0.25) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand((T, batch, *shape), generator=gen) < rate).float()


@torch.no_grad()
def simulate(net: DecolleNetwork, xs: torch.Tensor):
    """Spikes, membranes and readouts of every layer, stacked over time."""
    state, spikes, membranes, readouts = None, [], [], []
    for x in xs:
        out, state = net(x.to(net.layers[0].synapse.weight.dtype), state)
        spikes.append(out.spikes)
        membranes.append(out.membranes)
        readouts.append(out.readouts)
    stack = lambda seq: [torch.stack(z) for z in zip(*seq)]  # noqa: E731
    return stack(spikes), stack(membranes), stack(readouts)


def quiet_export(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NIRApproximationWarning)
        return export_nir(*args, **kwargs)


# --- exact mode ---------------------------------------------------------------------


@pytest.mark.parametrize("ordering", ["current", "lagged"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_exact_round_trip_gives_identical_spikes(tmp_path, arch, ordering):
    net, shape = make_net(arch, ordering)
    path = tmp_path / "net.nir"
    export_nir(net, path, mode="exact", input_shape=shape)
    back = from_nir(path)  # nir.write -> nir.read -> DecolleNetwork
    assert len(back.layers) == len(net.layers)
    for a, b in zip(net.layers, back.layers):
        assert a.params == b.params
    xs = spikes_in(shape)
    s1, u1, y1 = simulate(net, xs)
    s2, u2, y2 = simulate(back, xs)
    assert all(s.sum() > 0 for s in s1), "every layer should spike in this test"
    for a, b in zip(s1 + u1 + y1, s2 + u2 + y2):
        assert torch.equal(a, b)


def test_exact_graph_metadata_holds_dt_ordering_and_decays(tmp_path):
    net, shape = make_net("conv_pool", "lagged")
    path = tmp_path / "net.nir"
    export_nir(net, path, input_shape=shape, dt=2e-3)
    graph = nir.read(path)
    meta = graph.metadata
    assert float(meta["dt"]) == 2e-3
    assert meta["ordering"] == "lagged"
    assert meta["mode"] == "exact"
    assert meta["threshold_comparison"] == ">="
    p = net.layers[0].params  # the decays the network was built with
    for key, tau_key, value in (("alpha", "tau_mem", p.alpha), ("beta", "tau_syn", p.beta),
                                ("gamma", "tau_ref", p.gamma)):
        assert float(meta[key]) == value
        assert math.isclose(float(meta[tau_key]), 2e-3 / (1 - value), rel_tol=1e-12)
    assert "forward Euler" in meta["discretisation"]
    assert list(np.asarray(meta["input_shape"])) == list(shape)
    # the lagged ordering is a one-step Delay; max pooling a marked SumPool2d
    assert isinstance(graph.nodes["layer0_lag"], nir.Delay)
    assert graph.nodes["layer0_pool"].metadata["threefactor_pool"] == "max"
    assert isinstance(graph.nodes["layer0_rho"], nir.Scale)
    assert ("layer0_rho", "layer0_spike") in graph.edges  # the refractory feedback edge


def _back_edges(graph) -> set[tuple[str, str]]:
    """Edges that close a cycle (found by depth-first search from the inputs)."""
    succ: dict[str, list[str]] = {k: [] for k in graph.nodes}
    for a, b in graph.edges:
        succ[a].append(b)
    back, on_stack, done = set(), set(), set()

    def visit(n):
        on_stack.add(n)
        for m in succ[n]:
            if m in on_stack:
                back.add((n, m))
            elif m not in done:
                visit(m)
        on_stack.discard(n)
        done.add(n)

    for k, node in graph.nodes.items():
        if isinstance(node, nir.Input):
            visit(k)
    return back


def run_nir_graph(graph, xs: torch.Tensor, dt: float) -> dict[str, torch.Tensor]:
    """An independent float64 interpreter of the exact graph, following its stated discretisation.

    Per step, nodes run in topological order of the forward edges; feedback edges carry the
    previous step's value; LI is forward Euler passing on its updated state; Delay is one step.
    Returns every node's output over time.
    """
    back = _back_edges(graph)
    fwd = [e for e in graph.edges if e not in back]
    indeg = {k: 0 for k in graph.nodes}
    for _, b in fwd:
        indeg[b] += 1
    order, ready = [], [k for k, d in indeg.items() if d == 0]
    while ready:
        n = ready.pop()
        order.append(n)
        for a, b in fwd:
            if a == n:
                indeg[b] -= 1
                if indeg[b] == 0:
                    ready.append(b)
    assert len(order) == len(graph.nodes)
    t64 = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float64)  # noqa: E731
    state: dict[str, torch.Tensor] = {}
    prev: dict[str, torch.Tensor] = {}
    trace: dict[str, list] = {k: [] for k in graph.nodes}
    for x in xs.double():
        out: dict[str, torch.Tensor] = {}
        for name in order:
            node = graph.nodes[name]
            ins = [out[a] for a, b in fwd if b == name] + [prev[a] for a, b in back if b == name and a in prev]
            v = sum(ins[1:], ins[0]) if ins else None
            if isinstance(node, nir.Input):
                y = x
            elif isinstance(node, nir.Flatten):
                y = v.flatten(1)
            elif isinstance(node, nir.LI):
                s = state.get(name, torch.zeros_like(v))
                y = s + dt / t64(node.tau) * (t64(node.v_leak) - s + t64(node.r) * v)
                state[name] = y
            elif isinstance(node, nir.Delay):
                y = state.get(name, torch.zeros_like(v))
                state[name] = v
            elif isinstance(node, nir.Affine):
                y = v @ t64(node.weight).T + t64(node.bias)
            elif isinstance(node, nir.Conv2d):
                y = F.conv2d(v, t64(node.weight), t64(node.bias), tuple(node.stride),
                             tuple(node.padding), tuple(node.dilation), int(node.groups))
            elif isinstance(node, nir.SumPool2d):
                k = tuple(int(i) for i in node.kernel_size)
                if node.metadata.get("threefactor_pool") == "max":
                    y = F.max_pool2d(v, k, tuple(int(i) for i in node.stride))
                else:
                    y = F.avg_pool2d(v, k, tuple(int(i) for i in node.stride)) * math.prod(k)
            elif isinstance(node, nir.Threshold):
                ge = graph.metadata.get("threshold_comparison") == ">="
                y = ((v >= t64(node.threshold)) if ge else (v > t64(node.threshold))).double()
                trace.setdefault(name + ".input", []).append(v)
            elif isinstance(node, nir.Scale):
                y = v * t64(node.scale)
            elif isinstance(node, nir.Output):
                y = v
            else:  # pragma: no cover
                raise AssertionError(f"interpreter lacks {type(node).__name__}")
            out[name] = y
            trace[name].append(y)
        prev = out
    return {k: torch.stack(v) for k, v in trace.items() if v}


@pytest.mark.parametrize("ordering", ["current", "lagged"])
@pytest.mark.parametrize("arch", ["conv_pool", "conv_dense"])
def test_exact_graph_itself_computes_the_decolle_neuron(arch, ordering):
    """The graph, run node by node as its metadata describes, matches the network (float64)."""
    net, shape = make_net(arch, ordering)
    graph = export_nir(net, mode="exact", input_shape=shape)
    net = net.double()
    xs = spikes_in(shape)
    s_net, u_net, y_net = simulate(net, xs)
    trace = run_nir_graph(graph, xs, float(graph.metadata["dt"]))
    for i in range(len(net.layers)):
        assert torch.equal(trace[f"layer{i}_spike"], s_net[i].double())
        torch.testing.assert_close(trace[f"layer{i}_spike.input"], u_net[i], rtol=0, atol=1e-9)
        torch.testing.assert_close(trace[f"readout{i}"], y_net[i], rtol=0, atol=1e-9)
    assert torch.equal(trace["output"], s_net[-1].double())


def test_exact_import_needs_only_the_graph_and_dt():
    """from_nir reads the exact graph by its structure: decays come from the taus."""
    net, shape = make_net("conv_dense", "lagged")
    graph = export_nir(net, input_shape=shape)
    for node in graph.nodes.values():
        node.metadata = {k: v for k, v in node.metadata.items() if k == "threefactor_pool"}
    graph.metadata = {"dt": graph.metadata["dt"]}
    back = from_nir(graph)
    assert [layer.params.ordering for layer in back.layers] == ["lagged"] * 3
    xs = spikes_in(shape)
    for a, b in zip(simulate(net, xs)[0], simulate(back, xs)[0]):
        assert torch.equal(a, b)


def test_exact_without_readouts(tmp_path):
    net, shape = make_net("conv_dense")
    path = tmp_path / "net.nir"
    graph = export_nir(net, path, input_shape=shape, include_readouts=False)
    assert [k for k, n in graph.nodes.items() if isinstance(n, nir.Output)] == ["output"]
    back = from_nir(path)
    assert all(r.g.shape[0] == 0 for r in back.readouts)
    xs = spikes_in(shape)
    for a, b in zip(simulate(net, xs)[0], simulate(back, xs)[0]):
        assert torch.equal(a, b)


def test_readouts_are_affine_outputs_with_fixed_g():
    net, shape = make_net("dense")
    graph = export_nir(net, input_shape=shape)
    for i, readout in enumerate(net.readouts):
        node = graph.nodes[f"layer{i}_readout"]
        assert isinstance(node, nir.Affine)
        assert np.array_equal(node.weight, readout.g.numpy())
        assert not np.any(node.bias)
        assert isinstance(graph.nodes[f"readout{i}"], nir.Output)


# --- portable mode ------------------------------------------------------------------


@pytest.mark.parametrize("dialect", ["norse", "snntorch"])
def test_portable_mode_warns_what_it_approximates(dialect):
    net, shape = make_net("conv_pool", "lagged")
    with pytest.warns(NIRApproximationWarning) as record:
        graph = export_nir(net, mode="portable", dialect=dialect, input_shape=shape)
    message = str(record[0].message)
    for part in ("refractory", "max pooling", "bias", "threshold", "lagged"):
        assert part in message
    assert graph.metadata["mode"] == "portable"
    assert graph.metadata["dialect"] == dialect
    assert graph.metadata["approximations"]
    cuba = [n for n in graph.nodes.values() if isinstance(n, nir.CubaLIF)]
    assert len(cuba) == 2


def test_portable_dialect_conventions():
    net, shape = make_net("conv_pool")
    p = net.layers[0].params
    norse_g = quiet_export(net, mode="portable", dialect="norse", input_shape=shape)
    node = norse_g.nodes["layer0_neuron"]
    assert float(norse_g.metadata["dt"]) == 1e-3
    np.testing.assert_allclose(node.tau_syn, 1e-3 / (1 - p.beta))
    np.testing.assert_allclose(node.tau_mem, 1e-3 / (1 - p.alpha))
    assert np.all(node.r == 1) and np.all(node.v_leak == 0)
    np.testing.assert_allclose(node.w_in, 0.25)  # sum pooling of 2x2, divided by 4
    assert isinstance(norse_g.nodes["layer0_pool"], nir.SumPool2d)
    bias = net.layers[0].synapse.bias.detach().double().numpy()
    np.testing.assert_array_equal(node.v_threshold[:, 0, 0], -bias)
    assert not np.any(norse_g.nodes["layer0_synapse"].bias)

    snn_g = quiet_export(net, mode="portable", dialect="snntorch", input_shape=shape)
    node = snn_g.nodes["layer0_neuron"]
    assert float(snn_g.metadata["dt"]) == 1e-4 and float(snn_g.metadata["dt_model"]) == 1e-3
    np.testing.assert_allclose(1 - 1e-4 / node.tau_syn, p.beta)
    np.testing.assert_allclose(node.r, node.tau_mem / 1e-4)  # what snnTorch's importer asserts
    np.testing.assert_allclose(node.w_in * 1e-4 / node.tau_syn, 1.0)  # so it does not rescale
    assert np.all(node.v_threshold == 0)
    assert isinstance(snn_g.nodes["layer0_pool"], nir.AvgPool2d)
    np.testing.assert_array_equal(snn_g.nodes["layer0_synapse"].bias, bias.astype(np.float32))


@pytest.mark.parametrize("dialect", ["norse", "snntorch"])
def test_portable_graph_restores_the_network(tmp_path, dialect):
    net, shape = make_net("conv_dense", "lagged")
    path = tmp_path / "p.nir"
    quiet_export(net, path, mode="portable", dialect=dialect, input_shape=shape)
    back = from_nir(path)
    xs = spikes_in(shape)
    for a, b in zip(simulate(net, xs)[0], simulate(back, xs)[0]):
        assert torch.equal(a, b)


# --- errors -------------------------------------------------------------------------


def _one_sentence(err: Exception) -> str:
    text = str(err)
    assert "\n" not in text and text
    return text


def test_corrupt_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "corrupt.nir"
    bad.write_bytes(b"this is not HDF5 at all" * 10)
    with pytest.raises(NIRError) as info:
        from_nir(bad)
    text = _one_sentence(info.value)
    assert str(bad) in text and "not a readable NIR file" in text
    assert isinstance(info.value, ValueError)

    # a valid NIR file truncated half-way
    net, shape = make_net("dense")
    good = tmp_path / "good.nir"
    export_nir(net, good, input_shape=shape)
    cut = tmp_path / "cut.nir"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(NIRError, match="cut.nir: not a readable NIR file"):
        from_nir(cut)
    with pytest.raises(NIRError, match="missing.nir: no such NIR file"):
        from_nir(tmp_path / "missing.nir")


def test_unsupported_nodes_are_named(tmp_path):
    graph = nir.NIRGraph.from_list(
        nir.Affine(weight=np.ones((3, 4), np.float32), bias=np.zeros(3, np.float32)),
        nir.LIF(tau=np.ones(3), r=np.ones(3), v_leak=np.zeros(3), v_threshold=np.ones(3)),
    )
    graph.metadata = {"dt": 1e-3}
    path = tmp_path / "lif.nir"
    nir.write(path, graph)
    with pytest.raises(NIRError) as info:
        from_nir(path)
    text = _one_sentence(info.value)
    assert str(path) in text and "'lif' (LIF)" in text and "no DECOLLE equivalent" in text

    # a CubaLIF graph from another tool lacks the metadata that restores the neuron
    foreign = nir.NIRGraph.from_list(
        nir.Affine(weight=np.ones((3, 4), np.float32), bias=np.zeros(3, np.float32)),
        nir.CubaLIF(tau_syn=np.ones(3), tau_mem=np.ones(3), r=np.ones(3), v_leak=np.zeros(3),
                    v_threshold=np.ones(3)),
    )
    foreign.metadata = {"dt": 1e-3}
    with pytest.raises(NIRError, match="'cubalif' .*lacks the threefactor metadata"):
        from_nir(foreign)
    with pytest.raises(NIRError, match="no dt"):
        foreign.metadata = {}
        from_nir(foreign)


def test_export_errors_are_clear():
    net, shape = make_net("conv_pool")
    with pytest.raises(NIRError, match="input_shape"):
        export_nir(net)
    with pytest.raises(NIRError, match="mode must be one of"):
        export_nir(net, mode="fast", input_shape=shape)
    with pytest.raises(NIRError, match="portable mode only"):
        export_nir(net, mode="exact", dialect="norse", input_shape=shape)
    with pytest.raises(NIRError, match="dialect must be one of"):
        export_nir(net, mode="portable", dialect="loihi", input_shape=shape)
    with pytest.raises(NIRError, match="no checkpoint there"):
        export_nir("/nonexistent/run")


# --- checkpoints and the command line -----------------------------------------------


def test_export_from_run_directory_and_cli(tmp_path, capsys):
    from threefactor.train import save_checkpoint

    layers, shape = ARCHS["conv_dense"]
    cfg = Config(network=NetworkConfig(layers=list(layers)))
    net = build_network(cfg.network, shape, 3, cfg.seed)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run / "checkpoint.pt", net, opt, cfg, 1,
                    SimpleNamespace(input_shape=shape, classes=("a", "b", "c")))
    graph = export_nir(run, tmp_path / "a.nir")
    assert graph.metadata["source"] == str(run)
    back = from_nir(tmp_path / "a.nir")
    xs = spikes_in(shape)
    for a, b in zip(simulate(net.eval(), xs)[0], simulate(back, xs)[0]):
        assert torch.equal(a, b)

    parser = add_export_arguments(argparse.ArgumentParser())
    args = parser.parse_args([str(run / "checkpoint.pt"), str(tmp_path / "b.nir"), "--mode",
                              "portable", "--dialect", "snntorch", "--no-readouts"])
    assert export_cli(args) == 0
    captured = capsys.readouterr()
    assert "wrote" in captured.out and "warning" in captured.err
    assert not any(isinstance(n, nir.Output) and k != "output"
                   for k, n in nir.read(tmp_path / "b.nir").nodes.items())


# --- third-party importers ----------------------------------------------------------
# Before a neuron's first spike the portable graph is exact by construction (the CubaLIF
# filters equal our traces after the synapse, by linearity), so an importer that follows the
# dialect's convention must reproduce our layer-0 membranes there; the synaptic current is
# never reset, so it must match at every step. Tolerance: float32 rounding, 2e-6 absolute on
# quantities of order 1 (measured with Norse 1.1.0 and snnTorch 1.0.0: at most 2.4e-7).
TOL = 2e-6


def _layer0_reference(net: DecolleNetwork, xs: torch.Tensor, pool: str | None):
    """W Q and W P of layer 0 (no bias), with the portable pooling, at every step."""
    layer = net.layers[0]
    p, q = torch.zeros_like(xs[0]), torch.zeros_like(xs[0])
    wq, wp = [], []
    w = layer.synapse
    with torch.no_grad():
        for x in xs:
            p, q = input_trace_step(x, p, q, layer.params)
            a, b = w(q) - _bias(w, q), w(p) - _bias(w, p)
            if pool is not None:
                k = layer.pool.kernel_size
                a, b = F.avg_pool2d(a, k), F.avg_pool2d(b, k)
            wq.append(a)
            wp.append(b)
    return torch.stack(wq), torch.stack(wp)


def _bias(synapse, x):
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return synapse.bias.reshape(shape)


def _before_first_spike(spikes: torch.Tensor) -> torch.Tensor:
    """Mask of the steps strictly before each neuron's first spike."""
    return torch.cumsum(spikes, 0) == 0


def _negative_bias(net: DecolleNetwork) -> None:
    # neurons with a positive bias spike at step 0; negative ones wait for input
    with torch.no_grad():
        for layer in net.layers:
            layer.synapse.bias.copy_(-(layer.synapse.bias.abs() + 0.05))


@pytest.mark.filterwarnings("ignore:nirtorch.load is being deprecated:DeprecationWarning")
@pytest.mark.parametrize("arch", ["dense", "conv_pool"])
def test_norse_reproduces_the_portable_membranes(arch):
    norse = pytest.importorskip("norse.torch", reason="Norse is not installed (pip install norse)")
    net, shape = make_net(arch)
    _negative_bias(net)
    graph = quiet_export(net, mode="portable", dialect="norse", include_readouts=False,
                         input_shape=shape)
    module = norse.from_nir(graph, dt=float(graph.metadata["dt"]))
    xs = spikes_in(shape)
    state, cur, mem, spk = None, [], [], []
    with torch.no_grad():
        for x in xs:
            _, state = module(x, state)
            neuron_state = state.state["layer0_neuron"]
            if len(neuron_state) == 1:  # Norse 1.1 wraps the (synapse, lif) pair in a 1-tuple
                neuron_state = neuron_state[0]
            syn_state, lif_state = neuron_state
            cur.append(syn_state.v)
            mem.append(lif_state.v)
            spk.append(state.cache["layer0_neuron"])
    cur, mem, spk = torch.stack(cur), torch.stack(mem), torch.stack(spk)
    wq, wp = _layer0_reference(net, xs, "avg" if arch == "conv_pool" else None)
    torch.testing.assert_close(cur, wq, rtol=0, atol=TOL)
    quiet = _before_first_spike(spk)
    assert quiet.float().mean() > 0.2 and spk.sum() > 0
    torch.testing.assert_close(mem[quiet], wp[quiet], rtol=0, atol=TOL)
    if arch == "dense":  # no pooling: the first spikes are ours (U = W P + b >= 0)
        ours = simulate(net, xs)[0][0]
        assert torch.equal(_before_first_spike(ours), quiet)


@pytest.mark.parametrize("arch", ["dense", "conv_pool"])
def test_snntorch_reproduces_the_portable_membranes(arch):
    pytest.importorskip("snntorch", reason="snnTorch is not installed (pip install snntorch)")
    from snntorch.import_nir import import_from_nir

    net, shape = make_net(arch)
    _negative_bias(net)
    # snnTorch's importer (nirtorch's nir_to_torch) never finishes on graphs with several
    # Output nodes, so the readouts stay out
    graph = quiet_export(net, mode="portable", dialect="snntorch", include_readouts=False,
                         input_shape=shape)
    module = import_from_nir(graph)
    neuron = module.layer0_neuron
    xs = spikes_in(shape)
    cur, mem = [], []
    with torch.no_grad():
        for x in xs:
            module(x)
            cur.append(neuron.syn.clone())
            mem.append(neuron.mem.clone())
    cur, mem = torch.stack(cur), torch.stack(mem)
    p = net.layers[0].params
    # the bias enters as a constant input and is filtered like the spikes: its response
    # to a unit step is the traces' response to x = 1
    ones = torch.ones(1)
    fq, fp, pp, qq = [], [], torch.zeros(1), torch.zeros(1)
    for _ in range(T):
        pp, qq = input_trace_step(ones, pp, qq, p)
        fq.append(qq.item())
        fp.append(pp.item())
    wq, wp = _layer0_reference(net, xs, "avg" if arch == "conv_pool" else None)
    bias = _bias(net.layers[0].synapse, wq[0])
    ref_cur = wq + torch.tensor(fq).reshape(-1, 1, *([1] * (wq.dim() - 2))) * bias
    ref_mem = wp + torch.tensor(fp).reshape(-1, 1, *([1] * (wp.dim() - 2))) * bias
    torch.testing.assert_close(cur * (1 - p.beta), ref_cur, rtol=0, atol=TOL)
    fired = ref_mem > 0  # mem > 0 is the snnTorch spike; reset to zero follows
    quiet = _before_first_spike(fired.float())
    assert quiet.float().mean() > 0.2 and fired.any()
    scaled = mem * (1 - p.alpha) * (1 - p.beta)
    torch.testing.assert_close(scaled[quiet], ref_mem[quiet], rtol=0, atol=TOL)
