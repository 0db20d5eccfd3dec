"""The rules train any layer that keeps the step contract ``forward(x, state) -> (out, state)``
(``out.s`` spikes, ``out.u`` membranes, ``state`` a NamedTuple of tensors), not only ours.

The layer here is written from scratch: a current-based LIF neuron with an ``nn.Linear``
synapse, subclassing nothing of threefactor's.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from threefactor.data import MotionDataset
from threefactor.errors import LayerContractError
from threefactor.model.network import DecolleNetwork
from threefactor.model.surrogates import spike, surrogate_derivative
from threefactor.rules import BPTTRule, DecolleRule, STLLRRule, predict_sequence

F64 = torch.float64


class CubaState(NamedTuple):
    i: Tensor  # synaptic current
    v: Tensor  # membrane after the reset of the previous step


class CubaOutput(NamedTuple):
    s: Tensor
    u: Tensor


class CurrentLIF(nn.Module):
    """i = a i + W x + b,  u = b v + i,  s = Theta(u - 1) (fast-sigmoid surrogate),  v = u - s."""

    def __init__(self, n_in: int, n_out: int, a: float = 0.7, b: float = 0.9) -> None:
        super().__init__()
        self.synapse = nn.Linear(n_in, n_out)
        self.a, self.b = a, b

    def forward(self, x: Tensor, state: CubaState | None = None) -> tuple[CubaOutput, CubaState]:
        x = x.flatten(1)
        if state is None:
            zeros = x.new_zeros(x.shape[0], self.synapse.out_features)
            state = CubaState(zeros, zeros)
        i = self.a * state.i + self.synapse(x)
        u = self.b * state.v + i
        s = spike(u - 1.0, "fast_sigmoid")
        return CubaOutput(s, u), CubaState(i, u - s)


def _network(seed: int = 0, dropout: float = 0.0) -> DecolleNetwork:
    torch.manual_seed(seed)
    layers = [CurrentLIF(2 * 32 * 32, 64), CurrentLIF(64, 32)]
    with torch.no_grad():  # a gain that makes both layers spike on the motion data
        layers[0].synapse.weight.mul_(6.0)
        layers[1].synapse.weight.mul_(3.0)
    return DecolleNetwork.from_layers(layers, (2, 32, 32), 8, seed=seed, readout_scale=1.0, dropout=dropout)


@pytest.fixture(scope="module")
def motion():
    """64 recordings of the embedded motion dataset (8 classes), 30 steps of 0/1 input."""
    data = MotionDataset("train", n=64)
    x = torch.stack([torch.as_tensor(data[i][0][:30]) for i in range(len(data))]).float().clamp_(max=1.0)
    return x, torch.as_tensor(data.targets, dtype=torch.long)


def test_from_layers_sizes_each_readout_by_probing_the_layer():
    net = _network()
    assert [tuple(r.g.shape) for r in net.readouts] == [(8, 64), (8, 32)]
    assert not net.supports_closed_form()  # not a DecolleLayer: the rule takes autograd
    assert not DecolleRule(net, torch.optim.SGD(net.parameters(), lr=0.1)).uses_closed_form()
    assert all(not r.g.requires_grad for r in net.readouts)
    assert {id(p) for p in net.parameters()} == {id(p) for layer in net.layers for p in layer.parameters()}
    again = _network()
    assert all(torch.equal(a.g, b.g) for a, b in zip(net.readouts, again.readouts))  # drawn from the seed


def test_decolle_trains_a_user_layer_on_the_motion_data(motion):
    x, labels = motion
    net = _network()
    rule = DecolleRule(net, torch.optim.Adamax(net.parameters(), lr=2e-3, betas=(0.0, 0.95)), burn_in=5)
    before = predict_sequence(net, x, labels, burn_in=5).loss
    for _ in range(2):
        for idx in torch.arange(64).split(16):
            res = rule.train_sequence(x[idx], labels[idx])
            assert torch.all((res.rates > 0) & (res.rates < 1))
    after = predict_sequence(net, x, labels, burn_in=5).loss
    assert torch.all(after < 0.85 * before), (before, after)


def test_the_decolle_update_of_a_user_layer_is_its_local_gradient_in_closed_form(motion):
    """One learning step (burn-in 2 of 3 steps), SGD: dW = -lr (dL/dY G * sigma'(u - 1))^T x per
    layer, with x the layer's own input at that step (the previous layer's spikes)."""
    x, labels = motion[0][:6, :3].to(F64), motion[1][:6]
    net = _network().to(F64)
    ref = copy.deepcopy(net)
    lr = 0.5
    DecolleRule(net, torch.optim.SGD(net.parameters(), lr=lr), "mse", burn_in=2).train_sequence(x, labels)
    state = None
    with torch.no_grad():
        for t in range(2):
            _, state = ref(x[:, t], state)
    h = x[:, 2].flatten(1)
    target = F.one_hot(labels, 8).to(F64)
    for layer, readout, new, st in zip(ref.layers, ref.readouts, net.layers, state):
        syn = layer.synapse
        u = layer.b * st.v + (layer.a * st.i + F.linear(h, syn.weight, syn.bias))
        s = (u >= 1.0).to(F64)
        dl_ds = (s @ readout.g.t() - target) / len(labels) @ readout.g  # mse: 0.5 sum_k (Y - Yhat)^2
        dl_du = dl_ds * surrogate_derivative(u - 1.0, "fast_sigmoid")
        assert dl_du.abs().sum() > 0  # the step does learn
        torch.testing.assert_close(new.synapse.weight, syn.weight - lr * dl_du.t() @ h, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(new.synapse.bias, syn.bias - lr * dl_du.sum(0), rtol=1e-12, atol=1e-14)
        h = s


def test_bptt_trains_a_user_layer_through_time(motion):
    x, labels = motion[0][:16], motion[1][:16]
    net = _network()
    rule = BPTTRule(net, torch.optim.Adamax(net.parameters(), lr=5e-3), burn_in=5)
    losses = [rule.train_sequence(x, labels).loss for _ in range(8)]
    assert losses[-1][-1] < 0.9 * losses[0][-1], losses
    # the gradient crosses steps through the layer's own state: with one loss step at the end,
    # the last layer's update is not the local (DECOLLE) one of that step
    a, b = _network(), _network()
    BPTTRule(a, torch.optim.SGD(a.parameters(), lr=1.0), burn_in=29).train_sequence(x[:4], labels[:4])
    DecolleRule(b, torch.optim.SGD(b.parameters(), lr=1.0), burn_in=29).train_sequence(x[:4], labels[:4])
    start = _network().layers[1].synapse.weight
    moved_bptt, moved_local = a.layers[1].synapse.weight - start, b.layers[1].synapse.weight - start
    assert moved_local.abs().sum() > 0 and not torch.allclose(moved_bptt, moved_local)


class NoState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.synapse = nn.Linear(4, 3)

    def forward(self, x):  # no state argument
        s = (self.synapse(x) > 0).float()
        return CubaOutput(s, s), CubaState(s, s)


class DictState(NoState):
    def forward(self, x, state=None):
        s = (self.synapse(x) > 0).float()
        return CubaOutput(s, s), {"v": s}


class NoMembrane(NoState):
    def forward(self, x, state=None):
        s = (self.synapse(x) > 0).float()
        return (s,), CubaState(s, s)


class OnlyOutput(NoState):
    def forward(self, x, state=None):
        return CubaOutput(x, x)


@pytest.mark.parametrize("bad,said", [
    (lambda: NoState(), r"layer 1 \(NoState\) fails one step layer\(x, None\) on zeros of shape \(1, 4\): TypeError"),
    (lambda: DictState(), r"layer 1 \(DictState\)'s state is a dict, not a NamedTuple of tensors"),
    (lambda: NoMembrane(), r"layer 1 \(NoMembrane\)'s step output has no tensor \.s \(spikes\)"),
    (lambda: OnlyOutput(), r"layer 1 \(OnlyOutput\) returns CubaOutput from one step, not a pair"),
    (lambda: (lambda x, state=None: None), r"layer 1 \(function\) is not a torch.nn.Module"),
])
def test_a_layer_that_breaks_the_contract_is_refused_in_one_sentence(bad, said):
    with pytest.raises(LayerContractError, match=said) as caught:
        DecolleNetwork.from_layers([CurrentLIF(6, 4), bad()], (6,), 3)
    assert "\n" not in str(caught.value)


def test_stllr_refuses_a_user_layer_and_says_which():
    net = _network()
    with pytest.raises(ValueError, match=r"needs LIF layers .*layer 0 is a CurrentLIF"):
        STLLRRule(net, torch.optim.SGD(net.parameters(), lr=0.1))
