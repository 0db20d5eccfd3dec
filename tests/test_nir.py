"""NIR export and import (issues 7, 15, 16): exact round trips, the graph's own semantics, portable
graphs that Norse, snnTorch and nirtorch run exactly, layers numbered from 1 in node names (graphs
numbered from 0 still read), the run's dt, and `export --check`."""

from __future__ import annotations

import argparse
import math
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

nir = pytest.importorskip("nir", reason="the 'nir' package is not installed")

from threefactor.config import Config, LayerConfig, NetworkConfig, NeuronConfig  # noqa: E402
from threefactor.nir import (  # noqa: E402
    NIRApproximationWarning,
    NIRDtWarning,
    NIRError,
    add_export_arguments,
    export_cli,
    export_nir,
    from_nir,
    importer_problems,
    nirtorch_node_map,
)
from threefactor.model.network import DecolleNetwork, build_network  # noqa: E402

T = 50  # time steps per simulation
ARCHS = {
    "dense": ([LayerConfig("dense", 12, 1, 1), LayerConfig("dense", 7, 1, 1)], (20,)),
    "conv_pool": ([LayerConfig("conv", 4, 3, 2), LayerConfig("conv", 5, 3, 2)], (2, 12, 12)),
    "conv_dense": ([LayerConfig("conv", 4, 3, 2), LayerConfig("conv", 3, 3, 1),
                    LayerConfig("dense", 6, 1, 1)], (2, 8, 8)),
}


# neuron and readout settings besides the ordering; "authors" is the authors' formulation
VARIANTS = {
    "after_pool": dict(refractory="after_pool", spike_at_zero=True),
    "authors": dict(refractory="before_pool", spike_at_zero=False, readout_bias=True),
    "before_pool": dict(refractory="before_pool", spike_at_zero=True),
}


def make_net(arch: str, ordering: str = "current", seed: int = 1, gain: float = 3.0,
             variant: str = "after_pool") -> tuple[DecolleNetwork, tuple]:
    layers, shape = ARCHS[arch]
    v = dict(VARIANTS[variant])
    readout_bias = v.pop("readout_bias", False)
    cfg = NetworkConfig(layers=list(layers), neuron=NeuronConfig(ordering=ordering, **v),
                        readout_bias=readout_bias)
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


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("ordering", ["current", "lagged"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_exact_round_trip_gives_identical_spikes(tmp_path, arch, ordering, variant):
    net, shape = make_net(arch, ordering, variant=variant)
    path = tmp_path / "net.nir"
    export_nir(net, path, mode="exact", input_shape=shape)
    back = from_nir(path)  # nir.write -> nir.read -> DecolleNetwork
    assert len(back.layers) == len(net.layers)
    for a, b in zip(net.layers, back.layers):
        if a.pool is None:  # the placement of R means nothing without a pool
            a, b = a.params._replace(refractory="x"), b.params._replace(refractory="x")
        else:
            a, b = a.params, b.params
        assert a == b
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
    assert isinstance(graph.nodes["layer1_lag"], nir.Delay)
    assert graph.nodes["layer1_pool"].metadata["threefactor_pool"] == "max"
    assert isinstance(graph.nodes["layer1_rho"], nir.Scale)
    assert ("layer1_rho", "layer1_spike") in graph.edges  # the refractory feedback edge


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
                ge = node.metadata.get("comparison", graph.metadata.get("threshold_comparison")) == ">="
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


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("ordering", ["current", "lagged"])
@pytest.mark.parametrize("arch", ["conv_pool", "conv_dense"])
def test_exact_graph_itself_computes_the_decolle_neuron(arch, ordering, variant):
    """The graph, run node by node as its metadata describes, matches the network (float64)."""
    net, shape = make_net(arch, ordering, variant=variant)
    graph = export_nir(net, mode="exact", input_shape=shape)
    net = net.double()
    xs = spikes_in(shape)
    s_net, u_net, y_net = simulate(net, xs)
    trace = run_nir_graph(graph, xs, float(graph.metadata["dt"]))
    for i, layer in enumerate(net.layers):
        assert torch.equal(trace[f"layer{i + 1}_spike"], s_net[i].double())
        if f"layer{i + 1}_neurons_spike.input" in trace:  # R before the pool: U = maxpool(V - rho R)
            k = layer.pool.kernel_size
            u_graph = F.max_pool2d(trace[f"layer{i + 1}_neurons_spike.input"].flatten(0, 1), k).view_as(u_net[i])
        else:
            u_graph = trace[f"layer{i + 1}_spike.input"]
        torch.testing.assert_close(u_graph, u_net[i], rtol=0, atol=1e-9)
        torch.testing.assert_close(trace[f"readout{i + 1}"], y_net[i], rtol=0, atol=1e-9)
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
        node = graph.nodes[f"layer{i + 1}_readout"]
        assert isinstance(node, nir.Affine)
        assert np.array_equal(node.weight, readout.g.numpy())
        assert not np.any(node.bias)
        assert isinstance(graph.nodes[f"readout{i + 1}"], nir.Output)


# --- portable mode ------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dialect", ["norse", "snntorch"])
def test_portable_graph_restores_the_network(tmp_path, dialect, variant):
    net, shape = make_net("conv_dense", "lagged", variant=variant)
    path = tmp_path / "p.nir"
    quiet_export(net, path, mode="portable", dialect=dialect, input_shape=shape)
    back = from_nir(path)
    assert [layer.params for layer in back.layers] == [layer.params for layer in net.layers]
    xs = spikes_in(shape)
    s1, _, y1 = simulate(net, xs)
    s2, _, y2 = simulate(back, xs)
    for a, b in zip(s1, s2):
        assert torch.equal(a, b)
    assert torch.equal(y1[-1], y2[-1])  # the last layer's readout, the graph's output


def test_portable_mode_warns_only_what_it_approximates():
    # the authors' formulation, pooled, in both orderings: exact, so no warning
    for ordering in ("current", "lagged"):
        net, shape = make_net("conv_pool", ordering, variant="authors")
        with warnings.catch_warnings():
            warnings.simplefilter("error", NIRApproximationWarning)
            graph = export_nir(net, mode="portable", input_shape=shape)
        assert "approximations" not in graph.metadata
    # the refractory trace after a max pool, and U >= 0: both named
    net, shape = make_net("conv_pool", "current", variant="after_pool")
    with pytest.warns(NIRApproximationWarning) as record:
        graph = export_nir(net, mode="portable", input_shape=shape)
    message = str(record[0].message)
    assert "after the max pool (layers 1, 2)" in message and "U >= 0" in message
    assert graph.metadata["approximations"]


def test_portable_graph_uses_only_nodes_the_importers_take():
    net, shape = make_net("conv_dense", "lagged", variant="authors")
    for dialect in ("norse", "snntorch"):
        graph = export_nir(net, mode="portable", dialect=dialect, input_shape=shape)
        assert importer_problems(graph, "norse") == importer_problems(graph, "snntorch") == []
        kinds = {type(n).__name__ for n in graph.nodes.values()}
        assert kinds <= {"Input", "Output", "Linear", "Affine", "Conv2d", "SumPool2d", "LIF"}
        outputs = [k for k, n in graph.nodes.items() if isinstance(n, nir.Output)]
        assert outputs == ["output"]  # one output: the last layer's class scores
        assert list(graph.nodes["output"].output_type["output"]) == [3, 1, 1]
        # biases stay biases; no threshold below the reset
        for key, node in graph.nodes.items():
            if isinstance(node, nir.LIF):
                assert np.all(node.v_threshold >= node.v_reset), key
        bias = net.layers[0].synapse.bias.detach().numpy()
        np.testing.assert_array_equal(graph.nodes["layer1_synapse"].bias, bias)
    exact = export_nir(net, input_shape=shape)
    for importer in ("norse", "snntorch"):
        problems = "; ".join(importer_problems(exact, importer))
        assert "no Delay, LI, Scale, Threshold nodes" in problems and "Output nodes" in problems


def test_portable_dialects_differ_only_in_the_lif_step():
    net, shape = make_net("conv_pool", variant="authors")
    graphs = {d: export_nir(net, mode="portable", dialect=d, input_shape=shape, dt=3e-3)
              for d in ("norse", "snntorch")}
    assert graphs["norse"].nodes.keys() == graphs["snntorch"].nodes.keys()
    for key, node in graphs["norse"].nodes.items():
        other = graphs["snntorch"].nodes[key]
        if isinstance(node, nir.LIF):
            assert np.all(node.tau == 3e-3) and np.all(other.tau == 1e-4)
        elif hasattr(node, "weight"):
            np.testing.assert_array_equal(node.weight, other.weight)
    for d, g in graphs.items():
        assert float(g.metadata["dt"]) == 3e-3
        assert math.isclose(float(g.metadata["tau_mem"]), 3e-3 / (1 - net.layers[0].params.alpha))


def test_portable_errors_before_writing(tmp_path):
    net, shape = make_net("dense")
    net.layers[0].params = net.layers[0].params._replace(beta=0.0)
    with pytest.raises(NIRError, match="portable mode needs 0 < alpha, beta < 1"):
        export_nir(net, tmp_path / "x.nir", mode="portable", input_shape=shape)
    assert not (tmp_path / "x.nir").exists()


# --- layer numbering: from 1, as in metrics.jsonl; graphs numbered from 0 still read -----


def numbered_from_zero(graph):
    """``graph`` with its nodes named as format version 1 named them (``layer0_...``,
    ``readout0``): every layer's number one less."""
    def old(key: str) -> str:
        m = re.fullmatch(r"(layer|readout)(\d+)(.*)", key)
        return key if m is None else f"{m[1]}{int(m[2]) - 1}{m[3]}"

    nodes = {old(k): n for k, n in graph.nodes.items()}
    assert len(nodes) == len(graph.nodes)
    return nir.NIRGraph(nodes=nodes, edges=[(old(a), old(b)) for a, b in graph.edges],
                        metadata={**graph.metadata, "format_version": 1})


@pytest.mark.parametrize("mode", ["exact", "portable"])
def test_node_names_and_messages_number_layers_from_one(mode):
    net, shape = make_net("conv_dense", variant="after_pool")
    graph = quiet_export(net, mode=mode, input_shape=shape)
    numbers = {int(m[1]) for k in graph.nodes if (m := re.match(r"layer(\d+)_", k))}
    assert numbers == {1, 2, 3}
    assert "layer1_synapse" in graph.nodes and "layer3_spike" in graph.nodes
    assert int(graph.metadata["format_version"]) == 2
    if mode == "exact":
        assert [k for k, n in graph.nodes.items() if isinstance(n, nir.Output)] == [
            "readout1", "readout2", "readout3", "output"]
    else:
        assert ("layer3_readout", "output") in graph.edges
        with pytest.warns(NIRApproximationWarning, match=r"max pool \(layer 1\).*U >= 0 \(layers 1, 2, 3\)"):
            export_nir(net, mode="portable", input_shape=shape)
        net.layers[1].params = net.layers[1].params._replace(beta=0.0)
        with pytest.raises(NIRError, match="^layer 2: portable mode needs"):
            export_nir(net, mode="portable", input_shape=shape)


@pytest.mark.parametrize("variant", ["after_pool", "authors"])
@pytest.mark.parametrize("mode", ["exact", "portable"])
def test_graphs_numbered_from_zero_read_to_the_same_network(tmp_path, mode, variant):
    """A graph written before layers were numbered from 1 gives the network the current one
    gives: the same weights, readouts and parameters, the same spikes and readouts."""
    net, shape = make_net("conv_dense", "lagged", variant=variant)
    graph = quiet_export(net, mode=mode, input_shape=shape)
    path = tmp_path / "old.nir"
    nir.write(path, numbered_from_zero(graph))
    assert "layer0_synapse" in nir.read(path).nodes
    new, old = from_nir(graph), from_nir(path)
    assert [layer.params for layer in old.layers] == [layer.params for layer in new.layers]
    new_state, old_state = new.state_dict(), old.state_dict()
    assert new_state.keys() == old_state.keys()
    for key, value in new_state.items():
        assert torch.equal(value, old_state[key]), key
    xs = spikes_in(shape)
    for a, b in zip(sum(simulate(new, xs), []), sum(simulate(old, xs), [])):
        assert torch.equal(a, b)


def test_one_output_of_a_graph_numbered_from_zero_is_its_last_readout():
    from threefactor.nir.check import with_one_output

    net, shape = make_net("conv_dense")
    graph = export_nir(net, input_shape=shape)
    outputs = lambda g: [k for k, n in g.nodes.items() if isinstance(n, nir.Output)]  # noqa: E731
    assert outputs(with_one_output(graph)) == ["readout3"]
    assert outputs(with_one_output(numbered_from_zero(graph))) == ["readout2"]


# --- the run's dt ---------------------------------------------------------------------


def save_run(run, net: DecolleNetwork, cfg: Config, shape: tuple) -> None:
    """A run directory ``run`` whose checkpoint holds ``net``, built from ``cfg`` for three
    classes, after one epoch: what export_nir reads of a run."""
    from threefactor.config import dump_config
    from threefactor.run.checkpoint import write_checkpoint

    run.mkdir()
    write_checkpoint(run / "checkpoint.pt", {
        "config": dump_config(cfg), "input_shape": list(shape), "classes": ["a", "b", "c"],
        "sensor_size": None, "epoch": 1, "model": net.state_dict(),
    })


def _saved_run(tmp_path, dt_us: int = 3000):
    from threefactor.config import DataConfig

    layers, shape = ARCHS["conv_dense"]
    cfg = Config(network=NetworkConfig(layers=list(layers)),
                 data=DataConfig(dataset="nmnist", root="unused", dt_us=dt_us, timesteps=100))
    net = build_network(cfg.network, shape, 3, cfg.seed)
    run = tmp_path / "run"
    save_run(run, net, cfg, shape)
    return run, net


def test_export_uses_the_runs_dt_and_warns_on_an_override(tmp_path):
    run, net = _saved_run(tmp_path, dt_us=3000)
    p = net.layers[0].params
    for mode in ("exact", "portable"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # neither an approximation nor a dt warning
            graph = export_nir(run, mode=mode) if mode == "exact" else quiet_export(run, mode=mode)
        assert float(graph.metadata["dt"]) == 3e-3
        assert math.isclose(float(graph.metadata["tau_mem"]), 3e-3 / (1 - p.alpha), rel_tol=1e-12)
    exact = export_nir(run)
    np.testing.assert_allclose(exact.nodes["layer1_q"].tau, 3e-3 / (1 - p.beta))
    np.testing.assert_allclose(exact.nodes["layer1_p"].tau, 3e-3 / (1 - p.alpha))
    assert math.isclose(from_nir(exact).layers[0].params.alpha, p.alpha, rel_tol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_nir(run, dt=3e-3)  # the same dt, given: no warning
    with pytest.warns(NIRDtWarning, match="overrides the run's own 0.003 s"):
        graph = export_nir(run, dt=1e-3)
    assert float(graph.metadata["dt"]) == 1e-3
    assert graph.metadata["dt_source"] == "given, overriding the run's data.dt_us"


def test_cli_override_of_dt_warns(tmp_path, capsys):
    run, _ = _saved_run(tmp_path)
    parser = add_export_arguments(argparse.ArgumentParser())
    assert export_cli(parser.parse_args([str(run), str(tmp_path / "a.nir")])) == 0
    out, err = capsys.readouterr()
    assert "dt 0.003 s (the run's data.dt_us)" in out and "warning" not in err
    assert export_cli(parser.parse_args([str(run), str(tmp_path / "b.nir"), "--dt", "0.001"])) == 0
    out, err = capsys.readouterr()
    assert "warning: dt = 0.001 s overrides the run's own 0.003 s" in err


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
        nir.CubaLIF(tau_syn=np.ones(3), tau_mem=np.ones(3), r=np.ones(3), v_leak=np.zeros(3),
                    v_threshold=np.ones(3)),
    )
    graph.metadata = {"dt": 1e-3}
    path = tmp_path / "cubalif.nir"
    nir.write(path, graph)
    with pytest.raises(NIRError) as info:
        from_nir(path)
    text = _one_sentence(info.value)
    assert str(path) in text and "'cubalif' (CubaLIF)" in text and "no DECOLLE equivalent" in text

    # an Affine -> LIF graph from another tool lacks the metadata that restores the neuron
    foreign = nir.NIRGraph.from_list(
        nir.Affine(weight=np.ones((3, 4), np.float32), bias=np.zeros(3, np.float32)),
        nir.LIF(tau=np.ones(3), r=np.ones(3), v_leak=np.zeros(3), v_threshold=np.ones(3)),
    )
    foreign.metadata = {"dt": 1e-3}
    with pytest.raises(NIRError, match="'affine' .*lacks the threefactor metadata"):
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
    layers, shape = ARCHS["conv_dense"]
    # R after the pool: a formulation that portable mode approximates, so the CLI warns
    cfg = Config(network=NetworkConfig(layers=list(layers), neuron=NeuronConfig(refractory="after_pool")))
    net = build_network(cfg.network, shape, 3, cfg.seed)
    run = tmp_path / "run"
    save_run(run, net, cfg, shape)
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


def test_the_default_formulation_exports_to_portable_nir_without_approximation():
    layers, shape = ARCHS["conv_dense"]
    net = build_network(NetworkConfig(layers=list(layers)), shape, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NIRApproximationWarning)
        for dialect in ("norse", "snntorch"):
            export_nir(net, mode="portable", dialect=dialect, input_shape=shape)


# --- third-party importers (oracles: tests/oracles.txt) --------------------------------
# A portable graph is our network, computed in another order (float32): spikes must be equal
# and class scores, traces and membranes equal within float32 rounding. TOL is that rounding
# on quantities of order 1 to 10.
TOL = 1e-5


def _importer(name: str):
    """The importer's function, or a skip saying how to install it."""
    if name == "norse":
        norse = pytest.importorskip("norse.torch", reason="Norse is not installed (pip install norse)")
        return lambda g: norse.from_nir(g, dt=float(g.metadata["dt"]))
    pytest.importorskip("snntorch", reason="snnTorch is not installed (pip install snntorch)")
    from snntorch.import_nir import import_from_nir

    def load(g):
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):  # it prints as it goes
            return import_from_nir(g)

    return load


class _Hooks:
    """Input (U) and output (spikes) of named submodules at every step."""

    def __init__(self, module, names):
        self.u = {n: [] for n in names}
        self.s = {n: [] for n in names}
        subs = dict(module.named_modules())
        self.handles = [subs[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def hook(mod, args, out):
            self.u[name].append(args[0].detach().clone())
            self.s[name].append((out[0] if isinstance(out, tuple) else out).detach().clone())
        return hook


def _run_steps(module, xs):
    state, outs = None, []
    with torch.no_grad():
        for x in xs:
            y, state = module(x, state)
            outs.append(y.flatten(1))
    return torch.stack(outs)


@pytest.mark.oracle
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("importer", ["norse", "snntorch"])
@pytest.mark.parametrize("arch,ordering,variant", [
    ("dense", "lagged", "after_pool"), ("conv_pool", "current", "before_pool"),
    ("conv_pool", "lagged", "authors"), ("conv_dense", "current", "authors"),
])
def test_importer_runs_the_portable_graph_exactly(tmp_path, importer, arch, ordering, variant):
    """Batched, from the written file: every layer's spikes equal ours, the output is our last
    readout, and U (the input of each layer's LIF neurons) is ours, pooled as ours is."""
    load = _importer(importer)
    net, shape = make_net(arch, ordering, variant=variant)
    path = tmp_path / "p.nir"
    quiet_export(net, path, mode="portable", dialect=importer, input_shape=shape)
    graph = nir.read(path)
    module = load(graph)
    names = [f"layer{i}_neurons" if f"layer{i}_neurons" in graph.nodes else f"layer{i}_spike"
             for i in range(1, len(net.layers) + 1)]
    spike_names = [f"layer{i}_spike" for i in range(1, len(net.layers) + 1)]
    _assert_runs_like_ours(module, net, shape, names, spike_names)


def _assert_runs_like_ours(module, net, shape, names, spike_names) -> None:
    """The imported ``module`` over random input: its scores are our last readout, the spikes of
    ``spike_names`` ours, and the input of ``names`` (max-pooled where the layer pools) our U."""
    hooks = _Hooks(module, sorted(set(names + spike_names)))
    xs = spikes_in(shape)
    s_net, u_net, y_net = simulate(net, xs)
    scores = _run_steps(module, xs)
    assert all(s.sum() > 0 for s in s_net), "every layer should spike in this test"
    torch.testing.assert_close(scores, y_net[-1], rtol=0, atol=TOL)
    for i, layer in enumerate(net.layers):
        assert torch.equal(torch.stack(hooks.s[spike_names[i]]).flatten(2), s_net[i].flatten(2))
        u = torch.stack(hooks.u[names[i]])
        if layer.pool is not None and names[i] != spike_names[i]:
            u = F.max_pool2d(u.flatten(0, 1), layer.pool.kernel_size)
        torch.testing.assert_close(u.reshape(u_net[i].shape), u_net[i], rtol=0, atol=TOL)


@pytest.mark.oracle
@pytest.mark.parametrize("ordering", ["current", "lagged"])
@pytest.mark.parametrize("variant", ["after_pool", "authors"])
def test_nirtorch_interpreter_runs_the_exact_graph(tmp_path, ordering, variant):
    """nirtorch's generic graph interpreter wires the exact graph (order, loop edges, sums of
    inputs); our node map gives only the NIR nodes it has no mapping of. Membranes (the input
    of each Threshold) and spikes match ours."""
    nirtorch = pytest.importorskip("nirtorch", reason="nirtorch is not installed (pip install nirtorch)")
    from threefactor.nir.check import with_one_output

    net, shape = make_net("conv_dense", ordering, variant=variant)
    path = tmp_path / "e.nir"
    export_nir(net, path, input_shape=shape)
    graph = with_one_output(nir.read(path))
    assert [k for k, n in graph.nodes.items() if isinstance(n, nir.Output)] == ["readout3"]
    module = nirtorch.nir_to_torch(graph, nirtorch_node_map(float(graph.metadata["dt"])))
    names = [f"layer{i}_neurons_spike" if f"layer{i}_neurons_spike" in graph.nodes else f"layer{i}_spike"
             for i in range(1, len(net.layers) + 1)]
    spike_names = [f"layer{i}_spike" for i in range(1, len(net.layers) + 1)]
    _assert_runs_like_ours(module, net, shape, names, spike_names)


# --- a trained network, end to end: export --check -------------------------------------


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """The default network on a small subset of the embedded dataset, 2 epochs, in the
    authors' formulation (lagged, refractory before the pool, U > 0, readout bias)."""
    from threefactor.cli import main

    run = tmp_path_factory.mktemp("nir") / "run"
    sets = ["data.n_train=96", "data.n_test=32", "train.epochs=2", "train.progress=false",
            "train.plots=false", "train.tensorboard=false", "network.neuron.ordering=lagged",
            "network.neuron.refractory=before_pool", "network.neuron.spike_at_zero=false",
            "network.readout_bias=true"]
    assert main(["train", "--out", str(run), *[a for kv in sets for a in ("--set", kv)]]) == 0
    return run


@pytest.mark.oracle
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("mode,dialect,importer", [
    ("portable", "norse", "norse"), ("portable", "snntorch", "snntorch"), ("exact", None, "nirtorch"),
])
def test_check_a_trained_network_in_each_importer(trained_run, tmp_path, capsys, mode, dialect, importer):
    """`threefactor export RUN OUT.nir --check`: each importer classifies the run's test split
    as we do (margin: one sample of 32, for a vote flipped by float rounding), its spikes agree
    with ours and its membranes are ours within float32 rounding."""
    from threefactor.cli import main

    pytest.importorskip({"norse": "norse.torch", "snntorch": "snntorch", "nirtorch": "nirtorch"}[importer],
                        reason=f"{importer} is not installed (pip install {importer})")
    out = tmp_path / "net.nir"
    args = ["export", str(trained_run), str(out), "--mode", mode] + (["--dialect", dialect] if dialect else [])
    assert main(args + ["--check"]) == 0
    printed = capsys.readouterr().out
    assert f"check of {out} ({mode} mode" in printed and "32 samples" in printed
    rows = {line.split()[0]: line.split() for line in printed.splitlines() if line.startswith("  ")}
    ours = float(rows["ours"][1].rstrip("%"))
    for name in ("threefactor", importer):
        row = rows[name]
        assert abs(float(row[1].rstrip("%")) - ours) <= 100 / 32 + 0.05, row
        agreement = [float(v) for v in row[2:] if v.replace(".", "").isdigit()]
        diffs = [float(v) for v in row[2:] if "e" in v]
        assert len(agreement) == len(diffs) == 3 and min(agreement) > 99.9, row
        assert max(diffs) < TOL, row


@pytest.mark.oracle
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_check_reads_a_graph_numbered_from_zero(trained_run, tmp_path):
    """`export --check` finds every layer of a graph written before layers were numbered from 1."""
    pytest.importorskip("nirtorch", reason="nirtorch is not installed (pip install nirtorch)")
    from threefactor.nir import check_nir

    path = tmp_path / "old.nir"
    nir.write(path, numbered_from_zero(export_nir(trained_run)))
    report = check_nir(path, trained_run, importers=("threefactor", "nirtorch"), max_samples=8)
    for r in report.results:
        assert not r.skipped and abs(r.accuracy - report.ours) <= 1 / 8, r
        assert len(r.spike_agreement) == 3 and min(r.spike_agreement) > 0.999, r
