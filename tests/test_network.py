"""The network: locality of gradients, the fixed readouts and their feedback alignment."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from threefactor.config import Config, LayerConfig, NetworkConfig
from threefactor.model.layers import LocalReadout
from threefactor.model.init import lsuv_init
from threefactor.model.network import DecolleNetwork, build_network
from threefactor.rules import DecolleRule, local_loss, regulariser
from threefactor.run.from_config import make_optimizer


def _cfg(**kw) -> NetworkConfig:
    layers = [LayerConfig("conv", 3, 3, 2), LayerConfig("conv", 4, 3, 1), LayerConfig("dense", 6)]
    kw.setdefault("dropout", 0.0)  # tests that need readout dropout ask for it
    return NetworkConfig(layers=layers, readout_scale=2.0, **kw)


def _net(seed=0, gain=3.0, **kw) -> DecolleNetwork:
    net = build_network(_cfg(**kw), (2, 8, 8), 4, seed=seed)
    with torch.no_grad():
        for layer in net.layers:
            layer.synapse.weight.mul_(gain)
            layer.synapse.bias.add_(0.1)
    return net


def _x(T=5, B=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(B, T, 2, 8, 8, generator=gen) < 0.3).float(), torch.randint(0, 4, (B,), generator=gen)


def _leaves(t: torch.Tensor) -> set[int]:
    """ids of the leaf tensors (AccumulateGrad variables) that the graph of ``t`` reaches."""
    out, seen, todo = set(), set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            out.add(id(node.variable))
        todo.extend(n for n, _ in node.next_functions)
    return out


# --- construction ------------------------------------------------------------------------


def test_build_network_shapes_and_readout_sizes():
    net = build_network(_cfg(), (2, 8, 8), 4, seed=0)
    x, _ = _x(1)
    out, state = net(x[:, 0])
    assert [tuple(s.shape) for s in out.spikes] == [(3, 3, 4, 4), (3, 4, 4, 4), (3, 6)]
    assert [tuple(y.shape) for y in out.readouts] == [(3, 4)] * 3
    assert [tuple(r.g.shape) for r in net.readouts] == [(4, 48), (4, 64), (4, 6)]
    # P and Q have the layer's input shape (flattened for the dense layer), R the shape of its
    # neurons: unpooled with the refractory trace before the pool (the default), else pooled
    assert [tuple(s.p.shape) for s in state] == [(3, 2, 8, 8), (3, 3, 4, 4), (3, 64)]
    assert [tuple(s.r.shape) for s in state] == [(3, 3, 8, 8), (3, 4, 4, 4), (3, 6)]
    cfg = _cfg()
    cfg.neuron.refractory = "after_pool"
    _, state = build_network(cfg, (2, 8, 8), 4, seed=0)(x[:, 0])
    assert [tuple(s.r.shape) for s in state] == [(3, 3, 4, 4), (3, 4, 4, 4), (3, 6)]


def test_build_network_is_deterministic_by_seed():
    a, b, c = (build_network(_cfg(feedback_alignment=True), (2, 8, 8), 4, seed=s) for s in (1, 1, 2))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not any(torch.equal(sa[k], sc[k]) for k in sa if "weight" in k or ".g" in k)


@pytest.mark.parametrize(
    "layers,match",
    [
        ([LayerConfig("dense", 4, pool=2)], "cannot pool"),
        ([LayerConfig("dense", 4), LayerConfig("conv", 4)], "conv layer needs"),
        ([LayerConfig("conv", 4, 3, 16)], "empty"),
    ],
)
def test_build_network_rejects_impossible_stacks(layers, match):
    with pytest.raises(ValueError, match=match):
        build_network(NetworkConfig(layers=layers), (2, 8, 8), 4)


def test_readout_g_is_uniform_in_plus_minus_a_over_sqrt_fan_in():
    fan_in, scale = 400, 2.0
    r = LocalReadout(fan_in, 250, scale=scale, generator=torch.Generator().manual_seed(0))
    bound = scale / math.sqrt(fan_in)
    g = r.g.flatten()
    assert g.abs().max() <= bound
    assert g.max() > 0.99 * bound and g.min() < -0.99 * bound
    assert abs(g.mean().item()) < 0.01 * bound
    assert g.var().item() == pytest.approx(bound**2 / 3, rel=0.03)
    assert torch.equal(r.h, r.g)  # without feedback alignment, backward uses G itself


def test_readout_is_never_a_parameter_nor_in_the_optimiser_but_is_saved():
    net = _net(feedback_alignment=True)
    params = {id(p) for p in net.parameters()}
    layer_params = {id(p) for layer in net.layers for p in layer.parameters()}
    assert params == layer_params
    for r in net.readouts:
        assert id(r.g) not in params and id(r.h) not in params
        assert not r.g.requires_grad and not r.h.requires_grad
    keys = net.state_dict().keys()
    assert {f"readouts.{i}.{n}" for i in range(3) for n in ("g", "h")} <= set(keys)
    cfg = Config(network=_cfg(feedback_alignment=True))
    cfg.optim.layer_lr_scale = [1.0, 0.5, 2.0]
    opt = make_optimizer(cfg, net)
    opt_params = [id(p) for group in opt.param_groups for p in group["params"]]
    assert sorted(opt_params) == sorted(layer_params)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 0.5e-3, 2e-3])


# --- feedback alignment --------------------------------------------------------------------


def _normal_cdf(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def test_feedback_alignment_keeps_the_signs_of_g():
    r = LocalReadout(300, 400, feedback_alignment=True, generator=torch.Generator().manual_seed(4))
    g, h = r.g, r.h
    assert h.shape == g.shape
    assert not torch.equal(h, g)
    sign_ok = (torch.sign(h) == torch.sign(g)) | (h == 0)
    assert sign_ok.all()
    omega = h / g
    assert (omega >= 0).all()
    # omega ~ N(1, 1/2) elementwise (variance 1/2), negative values set to 0
    sd = math.sqrt(0.5)
    assert (omega == 0).float().mean().item() == pytest.approx(_normal_cdf(-1 / sd), abs=0.005)
    for z in (-1.0, 0.0, 0.5, 1.0, 2.0):  # the CDF above 0 is that of the normal
        assert (omega <= 1 + z * sd).float().mean().item() == pytest.approx(_normal_cdf(z), abs=0.005)


def test_feedback_alignment_forward_uses_g_backward_uses_h():
    gen = torch.Generator().manual_seed(1)
    r = LocalReadout(2 * 3 * 3, 5, scale=1.0, feedback_alignment=True, generator=gen).double()
    s = (torch.rand(4, 2, 3, 3, generator=gen, dtype=torch.float64) < 0.5).double().requires_grad_()
    y = r(s)
    torch.testing.assert_close(y, s.detach().flatten(1) @ r.g.t())
    grad_y = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    y.backward(grad_y)
    torch.testing.assert_close(s.grad.flatten(1), grad_y @ r.h)
    assert not torch.allclose(s.grad.flatten(1), grad_y @ r.g)
    assert r.g.grad is None and r.h.grad is None


def test_without_feedback_alignment_backward_uses_g():
    r = LocalReadout(6, 3, feedback_alignment=False).double()
    s = torch.rand(2, 6, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn(2, 3, dtype=torch.float64)
    r(s).backward(grad_y)
    torch.testing.assert_close(s.grad, grad_y @ r.g)


def test_feedback_alignment_changes_the_update_not_the_forward():
    """Same weights, same G: FA gives identical spikes and readouts but a different dW."""
    a = _net(seed=3, feedback_alignment=True)
    b = copy.deepcopy(a)
    for r in b.readouts:
        r.feedback_alignment = False
    x, labels = _x(4)
    grads, outs = [], []
    for net in (a, b):
        state = None
        for t in range(4):
            out, state = net(x[:, t], state)
        DecolleRule(net, None, loss="mse").layer_losses(out, labels).sum().backward()
        grads.append([l.synapse.weight.grad.clone() for l in net.layers])
        outs.append(out)
    for field in ("spikes", "membranes", "readouts"):
        assert all(torch.equal(u, v) for u, v in zip(getattr(outs[0], field), getattr(outs[1], field)))
    assert all(not torch.allclose(ga, gb) for ga, gb in zip(*grads))


# --- locality: no gradient across layers or steps ----------------------------------------


@pytest.mark.parametrize("k", [0, 1, 2])
def test_no_gradient_reaches_another_layer_or_an_earlier_step(k):
    net = _net()
    x, labels = _x(5)
    rule = DecolleRule(net, None, loss="smooth_l1", reg1=0.1, reg2=0.1)
    state = None
    history = []
    for t in range(5):
        out, state = net(x[:, t], state)
        history.append((out, state))
        for st in state:
            for tensor in st:
                assert tensor.grad_fn is None and not tensor.requires_grad
    out, _ = history[-1]
    own = {id(p) for p in net.layers[k].parameters()}
    # the graph of layer k's own loss at the last step reaches layer k's parameters, nothing else
    alone = local_loss(out.readouts[k], labels, "smooth_l1") + regulariser(out.membranes[k], 0.1, 0.1)
    assert _leaves(alone) == own
    # and backpropagating it (as the rule forms it) leaves every other layer without gradient
    rule.layer_losses(out, labels)[k].backward()
    for j, layer in enumerate(net.layers):
        for p in layer.parameters():
            if j == k:
                assert p.grad is not None and p.grad.abs().max() > 0
            else:
                assert p.grad is None or torch.all(p.grad == 0)
    # the spikes handed to the next layer carry no graph back into this one
    prev_out, _ = history[-2]
    assert all(_leaves(s) <= {id(p) for p in net.layers[i].parameters()} for i, s in enumerate(prev_out.spikes))


def test_without_detach_gradients_do_cross_layers():
    """The probe above is sensitive: with detach=False layer 2's loss reaches layer 1."""
    net = _net()
    x, labels = _x(3)
    state = None
    for t in range(3):
        out, state = net(x[:, t], state, detach=False)
    leaves = _leaves(local_loss(out.readouts[1], labels, "smooth_l1"))
    assert {id(p) for p in net.layers[0].parameters()} <= leaves


def test_dropout_acts_only_on_the_path_into_the_readout():
    a = _net(seed=5, dropout=0.5)
    b = copy.deepcopy(a)
    b.dropout.p = 0.0
    a.train(), b.train()
    x, _ = _x(6)
    sa = sb = None
    readouts_differ = False
    for t in range(6):
        oa, sa = a(x[:, t], sa)
        ob, sb = b(x[:, t], sb)
        for i in range(3):
            assert torch.equal(oa.spikes[i], ob.spikes[i])
            assert torch.equal(oa.membranes[i], ob.membranes[i])
        readouts_differ |= any(not torch.equal(ya, yb) for ya, yb in zip(oa.readouts, ob.readouts))
    assert readouts_differ
    a.eval()
    oa, _ = a(x[:, 0])
    ob, _ = b(x[:, 0])
    assert all(torch.equal(ya, yb) for ya, yb in zip(oa.readouts, ob.readouts))


def test_readout_is_g_times_spikes():
    net = _net()
    x, _ = _x(3)
    state = None
    for t in range(3):
        out, state = net(x[:, t], state)
    for s, y, r in zip(out.spikes, out.readouts, net.readouts):
        torch.testing.assert_close(y, s.flatten(1) @ r.g.t())


def test_lsuv_init_brings_membranes_to_unit_variance_and_target_mean():
    net = build_network(_cfg(), (2, 8, 8), 4, seed=0)
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(16, 12, 2, 8, 8, generator=gen) < 0.3).float()
    torch.manual_seed(0)
    stats = lsuv_init(net, x, target_mean=-0.5, skip_steps=2)
    assert len(stats) == 3
    for mean, var in stats:
        assert abs(mean + 0.5) < 0.2 and abs(var - 1.0) < 0.1
    assert net.training  # mode restored
