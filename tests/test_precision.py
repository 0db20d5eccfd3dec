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


def _train(precision: str, closed_form: bool = True, steps: int = 240):
    torch.manual_seed(0)
    net = _net()
    w0 = [p.detach().clone() for p in net.parameters()]
    rule = DecolleRule(net, Adamax(net.parameters(), lr=2e-3, betas=(0.0, 0.95)), burn_in=5,
                       closed_form=closed_form, precision=precision)
    losses = []
    for seq in range(steps // 30):
        x, labels = _inputs(35, seed=seq)
        losses.append(rule.train_sequence(x, labels).loss)
    return net, w0, torch.stack(losses), rule


def test_bf16_training_follows_fp32_training():
    """240 online steps on the same data: the weights' distance to the fp32 run stays below
    15 % of how far training moved them, and the per-sequence losses within 5 %; every
    parameter and all of the optimiser's state stay fp32."""
    ref, w0, ref_loss, _ = _train("fp32")
    low, _, low_loss, rule = _train("bf16")
    for p, q, w in zip(low.parameters(), ref.parameters(), w0):
        assert p.dtype == torch.float32
        assert float((p - q).norm() / (q - w).norm()) < 0.15
    assert torch.allclose(low_loss, ref_loss, rtol=0.05)
    for state in rule.optimizer.state.values():
        assert all(v.dtype == torch.float32 for v in state.values() if torch.is_tensor(v) and v.dim())


def test_bf16_inference_votes_like_fp32():
    net = _net()
    x, labels = _inputs(20, B=8)
    a = predict_sequence(net, x, labels, burn_in=3)
    b = predict_sequence(net, x, labels, burn_in=3, precision="bf16")
    assert b.votes.dtype == a.votes.dtype and b.loss.dtype == torch.float32
    assert float((a.votes == b.votes).float().mean()) >= 0.95
    assert torch.allclose(a.loss, b.loss, rtol=0.02)


def test_stllr_in_bf16_follows_fp32():
    cfg = copy.deepcopy(NET)
    cfg.neuron_model = "lif"
    net = build_network(cfg, SHAPE, CLASSES, seed=0)
    twin = copy.deepcopy(net)
    x, labels = _inputs(12)
    rules = [STLLRRule(n, torch.optim.SGD(n.parameters(), lr=0.0), burn_in=3, precision=p)
             for n, p in ((net, "fp32"), (twin, "bf16"))]
    for rule in rules:
        rule.train_sequence(x, labels)
    for p, q in zip(twin.parameters(), net.parameters()):
        assert p.grad.dtype == torch.float32 and _rel(p.grad, q.grad) < 0.03


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
