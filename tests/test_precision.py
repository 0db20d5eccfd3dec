"""bf16 mixed precision (``train.precision``, ``model.precision``): bf16 products, fp32 master
weights, gradients, optimiser state, traces, losses and votes.

What bf16 may change is bounded by its rounding (8 significant bits, 2^-9 relative): the
closed form and autograd agree within it; a step's spikes flip only where U lies within that
rounding of the threshold; training follows fp32 training with the same data. ``auto`` picks
bf16 only where the device computes it natively (given capabilities, not this machine's).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from threefactor.cli import build_parser
from threefactor.config import LayerConfig, NetworkConfig, NeuronConfig, load_config
from threefactor.errors import ConfigError
from threefactor.model.network import build_network
from threefactor.model.precision import compute_dtype, cpu_flags, native_bf16, resolve_precision
from threefactor.run.optim import Adamax
from threefactor.rules import DecolleRule, STLLRRule, make_rule, predict_sequence
from threefactor.rules.stllr import synapse_weight_grad

NET = NetworkConfig(
    layers=[LayerConfig("conv", 8, 3, 2), LayerConfig("conv", 8, 3, 1), LayerConfig("dense", 16)],
    neuron=NeuronConfig(alpha=0.9, beta=0.8), readout_scale=2.0, dropout=0.0, init="default",
)
SHAPE, CLASSES = (2, 12, 12), 4


def _net(cfg: NetworkConfig = NET, seed: int = 0):
    net = build_network(cfg, SHAPE, CLASSES, seed=seed)
    with torch.no_grad():  # a larger gain so that every layer spikes and learns
        for layer in net.layers:
            layer.synapse.weight.mul_(3.0)
            layer.synapse.bias.add_(0.1)
    return net


def _inputs(T: int, B: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(B, T, *SHAPE, generator=gen) < 0.2).float()
    return x, torch.randint(0, CLASSES, (B,), generator=gen)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


# --- choosing the precision ------------------------------------------------------------------


@pytest.mark.parametrize("flags,expected", [
    ({"avx512f", "avx512_bf16"}, "bf16"), ({"amx_bf16", "avx2"}, "bf16"),
    ({"avx2", "avx512f"}, "fp32"), (set(), "fp32"),
])
def test_auto_is_bf16_on_a_cpu_only_with_native_bf16(flags, expected):
    assert resolve_precision("auto", "cpu", flags=frozenset(flags)) == expected


@pytest.mark.parametrize("capability,expected", [((8, 0), "bf16"), ((9, 0), "bf16"), ((7, 5), "fp32")])
def test_auto_is_bf16_on_cuda_from_ampere_on(capability, expected):
    assert resolve_precision("auto", "cuda", capability=capability) == expected


def test_explicit_precisions_are_kept_and_unknown_ones_refused():
    for name in ("fp32", "bf16"):
        assert resolve_precision(name, "cpu", flags=frozenset()) == name
    assert compute_dtype("bf16") == torch.bfloat16 and compute_dtype("fp32") == torch.float32
    assert not native_bf16(torch.device("meta"))
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="resolve"):
        compute_dtype("auto")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n\nprocessor\t: 1\nflags\t: fpu\n")
    assert cpu_flags(info) == {"fpu", "avx512f", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_config_and_cli_set_the_precision_and_the_rule_resolves_it():
    cfg = load_config(None, ["train.precision=bf16", "network.layers.0.channels=4"])
    net = build_network(cfg.network, (2, 32, 32), 8, seed=0)
    rule = make_rule(cfg, net, torch.optim.SGD(net.parameters(), lr=0.1))
    assert rule.precision == "bf16" and rule.compute_dtype == torch.bfloat16
    auto = make_rule(load_config(None, ["train.precision=auto"]), net, torch.optim.SGD(net.parameters(), lr=0.1))
    assert auto.precision == resolve_precision("auto", "cpu")
    with pytest.raises(ConfigError, match="train.precision"):
        load_config(None, ["train.precision=fp16"])
    assert build_parser().parse_args(["train", "--precision", "bf16"]).precision == "bf16"


# --- what bf16 computes ----------------------------------------------------------------------


def test_bf16_forward_spikes_agree_with_fp32():
    """Each step from the same fp32 state: a spike flips only where U is within bf16 rounding
    of the threshold; at least 99 % of the spikes agree."""
    net = _net()
    x, _ = _inputs(20)
    agree = total = 0
    state = None
    with torch.no_grad():
        for t in range(x.shape[1]):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low, _ = net(x[:, t], state)
            out, state = net(x[:, t], state)
            for a, b in zip(low.spikes, out.spikes):
                assert a.dtype == torch.float32
                agree += int((a == b).sum())
                total += a.numel()
    assert agree / total >= 0.99


@pytest.mark.parametrize("fa", [False, True])
def test_closed_form_in_bf16_is_autograd_in_bf16(fa):
    """One step from the same weights: every weight gradient within 2 % (relative norm) of the
    autograd path's; the two round different intermediates (autocast also rounds the
    readout Y to bf16), each error ~2^-9 per element."""
    cfg = copy.deepcopy(NET)
    cfg.feedback_alignment = fa
    net = _net(cfg)
    twin = copy.deepcopy(net)
    fast = DecolleRule(net, torch.optim.SGD(net.parameters(), lr=0.0), burn_in=3, precision="bf16")
    slow = DecolleRule(twin, torch.optim.SGD(twin.parameters(), lr=0.0), burn_in=3, closed_form=False,
                       precision="bf16")
    assert fast.uses_closed_form() and not slow.uses_closed_form()
    x, labels = _inputs(4)
    a, b = fast.train_sequence(x, labels), slow.train_sequence(x, labels)
    for p, q in zip(net.parameters(), twin.parameters()):
        assert p.grad.dtype == torch.float32 and p.dtype == torch.float32
        assert _rel(p.grad, q.grad) < 0.02
    assert torch.equal(a.votes, b.votes)
    assert a.loss.dtype == torch.float32 and torch.allclose(a.loss, b.loss, rtol=0.02)


def _train(precision: str, perturb: float = 0.0, steps: int = 240):
    """``steps`` online steps of DECOLLE (Adamax) on a fixed stream of batches; ``perturb``: a
    relative perturbation of every initial weight, uniform in +-perturb."""
    torch.manual_seed(0)
    net = _net()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(5)
        for p in net.parameters():
            p.mul_(1 + perturb * (torch.rand(p.shape, generator=gen) * 2 - 1))
    w0 = [p.detach().clone() for p in net.parameters()]
    rule = DecolleRule(net, Adamax(net.parameters(), lr=2e-3, betas=(0.0, 0.95)), burn_in=5,
                       precision=precision)
    losses = []
    for seq in range(steps // 30):
        x, labels = _inputs(35, seed=seq)
        losses.append(rule.train_sequence(x, labels).loss)
    return [p.detach() for p in net.parameters()], w0, torch.stack(losses), rule


def test_bf16_training_follows_fp32_training():
    """240 online steps on the same data. Spiking training is chaotic: fp32 itself, started
    from weights perturbed by bf16's rounding (2^-9), ends 10-60 % (of how far training moved
    each parameter) away from the unperturbed run. bf16 must stay within 1.5 times that
    distance for every parameter, its mean loss within 2 % of fp32's, and
    every parameter and all of the optimiser's state must stay fp32."""
    ref, w0, ref_loss, _ = _train("fp32")
    near, _, _, _ = _train("fp32", perturb=2.0**-9)
    low, _, low_loss, rule = _train("bf16")
    for p, q, n, w in zip(low, ref, near, w0):
        assert p.dtype == torch.float32
        assert float((p - q).norm()) < 1.5 * float((n - q).norm())
        assert float((p - q).norm() / (q - w).norm()) < 0.7
    assert abs(float(low_loss.mean() / ref_loss.mean()) - 1) < 0.02
    for state in rule.optimizer.state.values():
        assert all(v.dtype == torch.float32 for v in state.values() if torch.is_tensor(v) and v.dim())


def test_bf16_inference_votes_like_fp32():
    """Votes come from fp32 readouts of the bf16 forward; a readout near a tie may vote for the
    other class: at least 85 % of the per-step votes agree, the losses within 2 %."""
    net = _net()
    x, labels = _inputs(20, B=8)
    a = predict_sequence(net, x, labels, burn_in=3)
    b = predict_sequence(net, x, labels, burn_in=3, precision="bf16")
    assert b.votes.dtype == a.votes.dtype and b.loss.dtype == torch.float32
    moved = float((a.votes - b.votes).abs().sum() / 2 / a.votes.sum())
    assert moved <= 0.15
    assert torch.allclose(a.loss, b.loss, rtol=0.02)


@pytest.mark.parametrize("kind", ["conv", "dense"])
def test_stllr_weight_gradient_map_in_bf16_is_fp32_within_rounding(kind):
    """The same traces and signals: the bf16 product is within 1 % (relative norm) of fp32's,
    in fp32."""
    gen = torch.Generator().manual_seed(0)
    if kind == "conv":
        syn, z, g = torch.nn.Conv2d(4, 6, 3, padding=1), torch.rand(5, 4, 8, 8, generator=gen), None
        g = torch.randn(5, 6, 8, 8, generator=gen)
    else:
        syn, z, g = torch.nn.Linear(20, 7), torch.rand(5, 20, generator=gen), torch.randn(5, 7, generator=gen)
    ref = synapse_weight_grad(syn, z, g)
    low = synapse_weight_grad(syn, z, g, torch.bfloat16)
    assert low.dtype == torch.float32 and low.shape == syn.weight.shape and _rel(low, ref) < 0.01


def test_stllr_in_bf16_fires_like_fp32_and_keeps_fp32_gradients():
    """Firing rates within 0.01 spikes per neuron-step of fp32's over a sequence (without
    updates, so the weights stay equal); every gradient fp32. The gradients themselves are not
    compared: they follow spikes and their products across layers, and one flipped spike moves
    them by much more than the rounding."""
    cfg = copy.deepcopy(NET)
    cfg.neuron_model = "lif"
    net = build_network(cfg, SHAPE, CLASSES, seed=0)
    with torch.no_grad():
        for layer in net.layers:
            layer.synapse.weight.mul_(2.0)
    twin = copy.deepcopy(net)
    x, labels = _inputs(12)
    ref, low = (STLLRRule(n, torch.optim.SGD(n.parameters(), lr=0.0), burn_in=3, precision=p).train_sequence(x, labels)
                for n, p in ((net, "fp32"), (twin, "bf16")))
    assert torch.allclose(low.rates, ref.rates, rtol=0.0, atol=0.01)
    assert all(p.grad.dtype == torch.float32 for p in twin.parameters())


def test_checkpoint_and_summary_of_a_bf16_run(tmp_path):
    from threefactor.run.checkpoint import load_checkpoint
    from threefactor.run.from_config import train

    cfg = load_config(None, ["train.precision=bf16", "train.epochs=1", "data.n_train=8", "data.n_test=8",
                             "data.timesteps=16", "rule.burn_in=4", "train.batch_size=8",
                             "train.tensorboard=false", "train.plots=false", "train.progress=false",
                             "network.layers.0.channels=4", "network.layers.1.channels=4",
                             "network.layers.2.channels=4"])
    lines: list[str] = []
    summary = train(cfg, tmp_path / "run", log=lines.append)
    assert summary["precision"] == "bf16"
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["precision"] == "bf16"
    assert any(line.startswith("precision: bf16") for line in lines)
    network, _, payload = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert all(v.dtype == torch.float32 for v in payload["model"].values() if v.is_floating_point())
    assert all(p.dtype == torch.float32 for p in network.parameters())
    # the run's test figures are those of its network evaluated in bf16, not in fp32
    from threefactor.run.evaluate import evaluate
    from threefactor.run.from_config import load_data

    _, test = load_data(cfg)
    batches = [(test.frames, test.labels)]
    losses = {p: evaluate(network, batches, cfg.rule.loss, cfg.rule.burn_in, precision=p)[1]
              for p in ("bf16", "fp32")}
    reported = list(summary["test_loss"].values())
    assert reported == pytest.approx(losses["bf16"], rel=1e-6)
    assert reported != pytest.approx(losses["fp32"], rel=1e-4)


@pytest.mark.parametrize("kind", ["ours_bf16", "ours_bf16_compiled", "theirs_autocast", "peak_conv_bf16"])
def test_speed_benchmark_measures_the_bf16_columns(kind):
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks import _harness as H
    from benchmarks import speed

    if kind == "theirs_autocast" and not H.authors_available()[0]:
        pytest.skip("decolle==0.2 (the authors' code) not installed")
    if kind == "peak_conv_bf16":
        r = speed.worker({"kind": kind, "threads": torch.get_num_threads()})
        assert r["dtype"] == "bf16" and r["gflops"] > 0
        return
    r = speed.worker({"kind": kind, "net": "small", "mode": "train", "batch": 2,
                      "target_s": 0.01, "threads": torch.get_num_threads()})
    assert r["steps"] >= 5 and r["sample_steps_per_s"] > 0
