"""User-defined local costs: the update follows from any cost(readout, target, layer) by autograd,
within each layer and step (the paper's central claim), and a cost that is not local is refused."""

from __future__ import annotations

import copy
import sys
import textwrap

import pytest
import torch

from threefactor.config import LayerConfig, NetworkConfig, NeuronConfig, load_config
from threefactor.model.network import build_network
from threefactor.rules import DecolleRule, LocalCostError, STLLRRule, predict_sequence
from threefactor.run.from_config import RunError, train


def _net(seed: int = 0, layers=None):
    cfg = NetworkConfig(
        layers=layers or [LayerConfig("conv", 3, 3, 2), LayerConfig("dense", 8)],
        neuron=NeuronConfig(alpha=0.9, beta=0.8), surrogate="fast_sigmoid", readout_scale=2.0,
        init="default", dropout=0.0,
    )
    net = build_network(cfg, (2, 8, 8), 4, seed=seed).double()
    with torch.no_grad():
        for layer in net.layers:
            layer.synapse.weight.mul_(3.0)
    return net


def _inputs(T: int, B: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(B, T, 2, 8, 8, generator=gen) < 0.3).double(), torch.arange(B) % 4


def mse_cost(y, labels, layer):
    """The built-in mse, written as a user would."""
    target = torch.nn.functional.one_hot(labels, y.shape[1]).to(y.dtype)
    return 0.5 * (y - target).pow(2).sum(1).mean()


def hinge_cost(y, labels, layer):
    """Multi-class hinge: the true class's readout above every other by a margin of 1."""
    true = y.gather(1, labels[:, None])
    return torch.relu(1.0 + y - true).scatter(1, labels[:, None], 0.0).sum(1).mean()


def test_a_user_cost_equal_to_mse_gives_the_closed_form_eq8_update():
    net = _net()
    twin = copy.deepcopy(net)
    closed = DecolleRule(net, torch.optim.Adamax(net.parameters(), lr=0.01, betas=(0.0, 0.95)), "mse", burn_in=2)
    user = DecolleRule(twin, torch.optim.Adamax(twin.parameters(), lr=0.01, betas=(0.0, 0.95)), mse_cost, burn_in=2)
    assert closed.uses_closed_form() and not user.uses_closed_form()
    w0 = [p.detach().clone() for p in net.parameters()]
    for seq in range(2):
        x, labels = _inputs(8, seed=seq)
        a, b = closed.train_sequence(x, labels), user.train_sequence(x, labels)
        assert torch.equal(a.votes, b.votes)
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-10, atol=1e-12)
    for p, q, p0 in zip(net.parameters(), twin.parameters(), w0):
        assert (p - p0).abs().max() > 1e-3  # both learned
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)


def _separable(seed: int, n: int = 24, T: int = 12):
    """Four classes, each a fixed random spike pattern flickering with noise."""
    gen = torch.Generator().manual_seed(seed)
    protos = torch.rand(4, 2, 8, 8, generator=torch.Generator().manual_seed(123)) < 0.25
    labels = torch.arange(n) % 4
    keep = torch.rand(n, T, 2, 8, 8, generator=gen) < 0.7
    return (protos[labels][:, None] & keep).double(), labels


def _accuracy(net, x, labels) -> float:
    net.eval()
    acc = (predict_sequence(net, x, labels, burn_in=2).votes[-1].argmax(1) == labels).double().mean().item()
    net.train()
    return acc


def test_a_hinge_cost_trains():
    net = _net(seed=3)
    rule = DecolleRule(net, torch.optim.Adamax(net.parameters(), lr=0.02, betas=(0.0, 0.95)), hinge_cost, burn_in=2)
    x_test, y_test = _separable(99)
    before = _accuracy(net, x_test, y_test)
    for epoch in range(6):
        x, labels = _separable(epoch)
        rule.train_sequence(x, labels)
    after = _accuracy(net, x_test, y_test)
    assert after >= 0.9 and after > before + 0.3, (before, after)


def test_a_regression_cost_with_a_target_per_step_trains():
    """Each layer's readout follows its own real-valued target, changing in time."""
    net = _net(seed=1)
    T = 12
    ramp = torch.linspace(-1, 1, T, dtype=torch.float64)
    targets = torch.stack([ramp, -ramp], 1)[None, :, :, None].expand(6, T, 2, 4)  # (B, T, layer, K)

    def tracking(y, target, layer):
        return (y - target[:, layer]).pow(2).mean()

    rule = DecolleRule(net, torch.optim.Adamax(net.parameters(), lr=0.02, betas=(0.0, 0.95)), tracking,
                       burn_in=2, target_per_step=True)
    x, _ = _inputs(T, seed=4)
    first = rule.train_sequence(x, targets).loss
    for _ in range(25):
        last = rule.train_sequence(x, targets).loss
    assert torch.all(last < 0.6 * first), (first, last)


def test_stllr_takes_a_user_cost_too():
    from threefactor.config import LIFConfig
    cfg = NetworkConfig(layers=[LayerConfig("dense", 10), LayerConfig("dense", 6)], neuron_model="lif",
                        lif=LIFConfig(gamma=0.8, v_th=0.5), init="default", dropout=0.0)
    net = build_network(cfg, (12,), 4, seed=0).double()
    twin = copy.deepcopy(net)
    x = (torch.rand(5, 8, 12, generator=torch.Generator().manual_seed(0)) < 0.4).double()
    labels = torch.arange(5) % 4
    STLLRRule(net, torch.optim.SGD(net.parameters(), lr=0.1), loss="mse").train_sequence(x, labels)
    STLLRRule(twin, torch.optim.SGD(twin.parameters(), lr=0.1), loss=mse_cost).train_sequence(x, labels)
    for p, q in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_a_cost_that_reaches_another_layer_is_refused():
    net = _net()
    seen = {}
    net.readouts[1].register_forward_hook(lambda m, inp, y: seen.__setitem__("last", y))

    def copies_the_last_layer(y, labels, layer):
        return (y - seen["last"]).pow(2).mean() + mse_cost(y, labels, layer)

    rule = DecolleRule(net, torch.optim.SGD(net.parameters(), lr=0.1), copies_the_last_layer)
    with pytest.raises(LocalCostError, match="^the local cost of layer 0 depends on the parameters of layer 1: "
                                             "a local cost may use only its own layer's readout and the target$"):
        rule.train_sequence(*_inputs(4))


def test_a_cost_that_reaches_an_earlier_step_is_refused():
    net = _net()
    earlier = {}

    def remembers(y, labels, layer):
        previous = earlier.get(layer, y)
        earlier[layer] = y
        return (y - previous).pow(2).mean() + mse_cost(y, labels, layer)

    rule = DecolleRule(net, torch.optim.SGD(net.parameters(), lr=0.1), remembers)
    with pytest.raises(LocalCostError, match="uses a tensor of an earlier time step"):
        rule.train_sequence(*_inputs(4))


def test_a_cost_that_is_not_a_scalar_is_refused():
    rule = DecolleRule(_net(), torch.optim.SGD(_net().parameters(), lr=0.1), lambda y, t, i: y)
    with pytest.raises(LocalCostError, match="returned Tensor of shape \\(6, 4\\), not a scalar tensor"):
        rule.train_sequence(*_inputs(3))


def test_the_cli_takes_a_cost_by_its_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_costs.py").write_text(textwrap.dedent('''
        import torch
        def hinge(y, labels, layer):
            true = y.gather(1, labels[:, None])
            return torch.relu(1.0 + y - true).scatter(1, labels[:, None], 0.0).sum(1).mean()
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    small = ["data.n_train=32", "data.n_test=16", "data.timesteps=20", "train.epochs=1",
             "train.batch_size=16", "train.progress=false", "train.plots=false", "train.tensorboard=false"]
    cfg = load_config(overrides=small + ["rule.loss=my_costs:hinge"])
    summary = train(cfg, tmp_path / "run", log=lambda m: None)
    assert len(summary["test_accuracy"]) == 3
    bad = load_config(overrides=small + ["rule.loss=my_costs:hinje"])
    with pytest.raises(RunError, match="^loss 'my_costs:hinje': cannot import 'hinje' from 'my_costs'"):
        train(bad, tmp_path / "bad", log=lambda m: None)
    assert not (tmp_path / "bad").exists()  # refused before anything was written
    sys.modules.pop("my_costs", None)
