"""Error-triggered DECOLLE (Payvand et al. 2020): errors become events only above a threshold,
the threshold follows a target event rate, and threshold 0 is plain DECOLLE."""

from __future__ import annotations

import copy

import pytest
import torch

from threefactor.config import ConfigError, LayerConfig, NetworkConfig, NeuronConfig, load_config
from threefactor.model.network import build_network
from threefactor.rules import DecolleRule, ErrorTrigger, make_rule
from threefactor.rules import local_loss


def _net(seed=0):
    cfg = NetworkConfig(
        layers=[LayerConfig("conv", 3, 3, 2), LayerConfig("conv", 4, 3, 1), LayerConfig("dense", 6)],
        neuron=NeuronConfig(alpha=0.9, beta=0.8), surrogate="fast_sigmoid", readout_scale=2.0, dropout=0.0,
    )
    net = build_network(cfg, (2, 8, 8), 4, seed=seed)
    with torch.no_grad():
        for layer in net.layers:
            layer.synapse.weight.mul_(3.0)
            layer.synapse.bias.add_(0.1)
    return net


def _inputs(T, B=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(B, T, 2, 8, 8, generator=gen) < 0.3).float(), torch.randint(0, 4, (B,), generator=gen)


def _adamax(net):
    return torch.optim.Adamax(net.parameters(), lr=3e-3, betas=(0.0, 0.95))


def test_threshold_zero_is_plain_decolle():
    plain, trig = _net(), _net()
    # the autograd path, as the trigger's (the closed form equals it: test_closed_form.py)
    r_plain = DecolleRule(plain, _adamax(plain), loss="mse", reg1=0.1, reg2=0.1, burn_in=2, closed_form=False)
    r_trig = DecolleRule(trig, _adamax(trig), loss="mse", reg1=0.1, reg2=0.1, burn_in=2,
                         error_trigger=ErrorTrigger(threshold=0.0))
    for seed in range(3):
        x, labels = _inputs(10, seed=seed)
        a, b = r_plain.train_sequence(x, labels), r_trig.train_sequence(x, labels)
        assert torch.equal(a.votes, b.votes) and torch.equal(a.loss, b.loss)
    for p, q in zip(plain.parameters(), trig.parameters()):
        assert torch.equal(p, q)
    assert a.stats is None
    assert all(0 < f <= 1 for f in b.stats["update_fraction"])  # the non-zero errors are counted


def test_threshold_zero_from_the_config_is_plain_decolle():
    over = ["data.timesteps=12", "rule.burn_in=2"]
    cfg_plain = load_config(None, over)
    cfg_trig = load_config(None, over + ["rule.error_trigger.threshold=0"])
    nets = [build_network(c.network, (2, 8, 8), 4) for c in (cfg_plain, cfg_trig)]
    rules = [make_rule(c, n, _adamax(n)) for c, n in zip((cfg_plain, cfg_trig), nets)]
    assert rules[0].error_trigger is None and rules[1].error_trigger is not None
    assert cfg_plain.network.dropout > 0  # the same dropout masks for both: same seed
    x, labels = _inputs(12)
    for r in rules:
        torch.manual_seed(1)
        r.train_sequence(x, labels)
    for p, q in zip(*(n.parameters() for n in nets)):
        assert torch.equal(p, q)


@pytest.mark.parametrize("mode", ["gate", "ternary"])
def test_update_is_the_decolle_update_of_the_quantised_error(mode):
    """One learning step: dW is the DECOLLE gradient with dL/dS replaced by its error events,
    E [|E| > th] (gate) or th sign(E) [|E| > th] (ternary)."""
    net = _net()
    ref = copy.deepcopy(net)
    T, th = 6, 0.05
    x, labels = _inputs(T)
    rule = DecolleRule(net, torch.optim.SGD(net.parameters(), lr=0.0), loss="mse", burn_in=T - 1,
                       error_trigger=ErrorTrigger(threshold=th, mode=mode))
    res = rule.train_sequence(x, labels)
    state = None
    with torch.no_grad():
        for t in range(T - 1):
            _, state = ref(x[:, t], state)
    out, _ = ref(x[:, -1], state)
    fractions = []
    for i, layer in enumerate(ref.layers):
        s = out.spikes[i]
        e = torch.autograd.grad(local_loss(out.readouts[i], labels, "mse"), s, retain_graph=True)[0]
        event = e.abs() > th
        fractions.append(event.float().mean().item())
        q = e * event if mode == "gate" else th * torch.sign(e) * event
        want = torch.autograd.grad(s, list(layer.parameters()), grad_outputs=q, retain_graph=True)
        for p, w in zip(net.layers[i].parameters(), want):
            if event.any():
                torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-9)
            else:
                assert p.grad is None
    assert 0 < min(fractions) and max(fractions) < 1  # the threshold really splits the errors
    assert res.stats["update_fraction"] == pytest.approx(fractions)


def test_layer_without_error_events_is_not_updated():
    net = _net()
    before = copy.deepcopy(net.state_dict())
    opt = _adamax(net)
    rule = DecolleRule(net, opt, burn_in=1, error_trigger=ErrorTrigger(threshold=1e6))
    res = rule.train_sequence(*_inputs(8))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert opt.state == {}  # the optimiser never saw a gradient
    assert res.stats["update_fraction"] == [0.0, 0.0, 0.0]
    assert res.stats["step_fraction"] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("target", [0.05, 0.2])
def test_threshold_adapts_to_the_target_event_rate(target):
    net = _net()
    trigger = ErrorTrigger(target_rate=target, adapt=0.2)
    rule = DecolleRule(net, _adamax(net), loss="mse", burn_in=2, error_trigger=trigger)
    fractions = []
    for seed in range(6):
        res = rule.train_sequence(*_inputs(30, B=8, seed=seed))
        fractions.append(res.stats["update_fraction"])
    last = fractions[-1]
    for f in last:  # every layer, after adaptation: near the target
        assert abs(f - target) < 0.35 * target, fractions
    assert all(th > 0 for th in res.stats["threshold"])
    # most (step, neuron) pairs send no error event
    assert max(last) < 0.5


def test_error_trigger_is_an_option_of_decolle_only():
    with pytest.raises(ConfigError, match="error_trigger"):
        load_config(None, ["rule.name=bptt", "rule.error_trigger.target_rate=0.1"])
    with pytest.raises(ConfigError, match="target_rate"):
        load_config(None, ["rule.error_trigger.target_rate=1.5"])
    cfg = load_config(None, ["rule.error_trigger.target_rate=0.1", "rule.error_trigger.mode=ternary"])
    assert cfg.rule.error_trigger.target_rate == 0.1 and cfg.rule.error_trigger.threshold is None
