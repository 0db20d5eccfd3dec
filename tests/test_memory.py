"""Training memory: DECOLLE and S-TLLR keep the same tensors alive whatever the sequence length
T; BPTT holds the graph of the whole sequence, so its memory grows linearly with T.

Measured as the peak number of bytes of tensors saved for backward that are alive at once
(counted by ``saved_tensors_hooks``: a saved tensor is counted from the forward that saves it
until its graph is freed), plus the state a rule keeps across steps.
"""

from __future__ import annotations

import pytest
import torch

from threefactor.config import LayerConfig, NetworkConfig
from threefactor.model.network import build_network
from threefactor.rules import BPTTRule, DecolleRule, STLLRRule


class _Meter:
    """Live and peak bytes of saved-for-backward tensors."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0

    def pack(self, t: torch.Tensor):
        return _Saved(self, t)

    @staticmethod
    def unpack(saved: "_Saved") -> torch.Tensor:
        return saved.t


class _Saved:
    def __init__(self, meter: _Meter, t: torch.Tensor) -> None:
        self.meter, self.t = meter, t
        self.bytes = t.numel() * t.element_size()
        meter.live += self.bytes
        meter.peak = max(meter.peak, meter.live)

    def __del__(self) -> None:
        self.meter.live -= self.bytes


def _net(model: str):
    cfg = NetworkConfig(
        layers=[LayerConfig("conv", 4, 3, 2), LayerConfig("conv", 4, 3, 1), LayerConfig("dense", 8)],
        neuron_model=model, readout_scale=2.0, dropout=0.0,
    )
    net = build_network(cfg, (2, 8, 8), 4, seed=0)
    with torch.no_grad():
        for layer in net.layers:
            layer.synapse.weight.mul_(3.0)
    return net


def _rule(name: str):
    if name.startswith("decolle"):
        net = _net("decolle")
        return DecolleRule(net, torch.optim.Adamax(net.parameters(), lr=1e-3), burn_in=2,
                           closed_form=name == "decolle")
    if name.startswith("stllr"):
        net = _net("lif")
        update = name.split("-")[1]
        return STLLRRule(net, torch.optim.Adamax(net.parameters(), lr=1e-3), burn_in=2, update=update)
    net = _net("lif" if name == "bptt-lif" else "decolle")
    return BPTTRule(net, torch.optim.Adamax(net.parameters(), lr=1e-3), burn_in=2)


def _measure(name: str, T: int) -> tuple[int, object]:
    torch.manual_seed(0)
    rule = _rule(name)
    gen = torch.Generator().manual_seed(1)
    x = (torch.rand(2, T, 2, 8, 8, generator=gen) < 0.3).float()
    labels = torch.tensor([1, 3])
    meter = _Meter()
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        rule.train_sequence(x, labels)
    assert meter.live == 0  # nothing saved for backward outlives the sequence
    return meter.peak, rule


LENGTHS = (10, 20, 40)


@pytest.mark.parametrize("name", ["decolle", "decolle-autograd", "stllr-step", "stllr-sequence"])
def test_online_rules_memory_does_not_grow_with_T(name):
    peaks, rules = zip(*(_measure(name, T) for T in LENGTHS))
    if name == "decolle":  # the closed-form step keeps nothing for a backward pass at all
        assert set(peaks) == {0}
    else:  # one step's graph, whatever T
        assert peaks[0] > 0
        assert len(set(peaks)) == 1, dict(zip(LENGTHS, peaks))
    if name.startswith("stllr"):  # the traces kept across steps have the same size for every T
        sizes = {sum(t.numel() for tr in r.traces for t in tr if t is not None) for r in rules}
        assert len(sizes) == 1


@pytest.mark.parametrize("name", ["bptt", "bptt-lif"])
def test_bptt_memory_grows_linearly_with_T(name):
    peaks = [_measure(name, T)[0] for T in LENGTHS]
    d1, d2 = peaks[1] - peaks[0], peaks[2] - peaks[1]  # 10 and 20 more steps
    assert d1 > 0
    assert d2 == pytest.approx(2 * d1, rel=0.02), dict(zip(LENGTHS, peaks))
    # and at T = 40 BPTT holds many times what the online rules hold
    online = _measure("decolle" if name == "bptt" else "stllr-step", 40)[0]
    assert peaks[2] > 10 * online
