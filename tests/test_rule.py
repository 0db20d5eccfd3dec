"""The DECOLLE rule: autograd within one layer and one step equals the closed form (Eq. 7, 8).

SPEC: "Computing it by autograd within one layer and one step must give the same numbers as
the closed form: that is a test." Closed forms here are written from the equations, with
``unfold``/``einsum`` for convolutions and a hand-made argmax mask for max-pooling.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from threefactor.config import LayerConfig, NetworkConfig, NeuronConfig
from threefactor.model.layers import DecolleLayer, LocalReadout
from threefactor.model.network import build_network
from threefactor.model.neurons import DecolleParams, DecolleState, input_trace_step
from threefactor.model.surrogates import SURROGATES, spike, surrogate_derivative
from threefactor.rules import LOSSES, DecolleRule, local_loss, predict_sequence, regulariser

F64 = torch.float64


# --- closed forms ---------------------------------------------------------------------


def dloss_dy(y: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """dL/dY of the batch-averaged local loss, written out by hand."""
    B, C = y.shape
    target = F.one_hot(labels, C).to(y.dtype)
    if kind == "mse":  # 0.5 * sum_k (Y_k - Yhat_k)^2, mean over batch -> (Y - Yhat) / B
        return (y - target) / B
    if kind == "smooth_l1":  # mean over B*C elements of the Huber loss with beta = 1
        return (y - target).clamp(-1.0, 1.0) / (B * C)
    if kind == "cross_entropy":
        return (torch.softmax(y, 1) - target) / B
    raise AssertionError(kind)


def eq8_error(y: torch.Tensor, labels: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Eq. 8 for MSE, per sample: error_i = sum_k G_ki (Y_k - Yhat_k)."""
    target = F.one_hot(labels, y.shape[1]).to(y.dtype)
    return torch.einsum("ki,bk->bi", g, y - target)


def dreg_du(u: torch.Tensor, reg1: float, reg2: float) -> torch.Tensor:
    """d/dU of lambda1 <[U + 0.01]+> + lambda2 [0.1 - <U>]+ (averages over the layer, then batch)."""
    uf = u.flatten(1)
    B, N = uf.shape
    g1 = reg1 * (uf + 0.01 > 0).to(u.dtype) / (B * N)
    g2 = -reg2 * (0.1 - uf.mean(1, keepdim=True) > 0).to(u.dtype) / (B * N)
    return (g1 + g2).reshape(u.shape)


def pool_mask(u_full: torch.Tensor, k: int) -> torch.Tensor:
    """1 at the argmax of every non-overlapping k x k window, 0 elsewhere (same shape as u_full)."""
    B, C, H, W = u_full.shape
    win = u_full.reshape(B, C, H // k, k, W // k, k).permute(0, 1, 2, 4, 3, 5).reshape(B, C, H // k, W // k, k * k)
    onehot = F.one_hot(win.argmax(-1), k * k).to(u_full.dtype)
    return onehot.reshape(B, C, H // k, W // k, k, k).permute(0, 1, 2, 4, 3, 5).reshape(B, C, H, W)


def closed_form_weight_grad(layer: DecolleLayer, p: torch.Tensor, dl_du: torch.Tensor):
    """Eq. 7, dW_ij = (dL/dU_i) P_j, for a dense or (pooled) conv synapse. Returns (dW, db)."""
    syn = layer.synapse
    if isinstance(syn, nn.Linear):
        p = p.flatten(1)
        return torch.einsum("bi,bj->ij", dl_du, p), dl_du.sum(0)
    k = syn.kernel_size[0]
    pad = syn.padding[0]
    if layer.pool is not None:
        kp = layer.pool.kernel_size
        with torch.no_grad():
            u_full = syn(p)
        mask = pool_mask(u_full, kp)
        # only the winner of each window receives the post-synaptic factor
        dl_du = mask * dl_du.repeat_interleave(kp, 2).repeat_interleave(kp, 3)
    patches = F.unfold(p, k, padding=pad)  # (B, C*k*k, L)
    dw = torch.einsum("bol,bcl->oc", dl_du.flatten(2), patches).reshape(syn.weight.shape)
    return dw, dl_du.sum((0, 2, 3))


def closed_form_dl_du(u, y, labels, g, kind, surrogate, reg1=0.0, reg2=0.0):
    """dL/dU = (G^T dL/dY) * sigma'(U) + dReg/dU."""
    dl_ds = (dloss_dy(y, labels, kind) @ g).reshape(u.shape)
    return dl_ds * surrogate_derivative(u, surrogate) + dreg_du(u, reg1, reg2)


# --- one layer, one step -----------------------------------------------------------------


def _random_state(x_shape, out_shape, gen) -> DecolleState:
    return DecolleState(
        torch.rand(x_shape, generator=gen, dtype=F64),
        torch.rand(x_shape, generator=gen, dtype=F64),
        torch.rand(out_shape, generator=gen, dtype=F64) * 0.5,
    )


def _make_layer(kind: str, surrogate: str, gen: torch.Generator):
    """(layer, input spikes, previous state) with membranes spread around the threshold."""
    # R after the pool: the manual Eq. 7 below routes dL/dU through the pool of W P + b alone
    # (the refractory trace before the pool: test_closed_form.py and test_decolle_public.py)
    params = DecolleParams(alpha=0.9, beta=0.8, gamma=0.6, rho=0.8, refractory="after_pool", spike_at_zero=True)
    B = 3
    if kind == "dense":
        syn = nn.Linear(7, 5, dtype=F64)
        x_shape, out_shape, pool = (B, 7), (B, 5), 1
    else:
        syn = nn.Conv2d(2, 3, 3, padding=1, dtype=F64)
        pool = 2 if kind == "conv_pool" else 1
        x_shape, out_shape = (B, 2, 6, 6), (B, 3, 6 // pool, 6 // pool)
    with torch.no_grad():
        syn.weight.copy_(torch.randn(syn.weight.shape, generator=gen, dtype=F64) * 0.4)
        syn.bias.copy_(torch.randn(syn.bias.shape, generator=gen, dtype=F64) * 0.2)
    layer = DecolleLayer(syn, params, pool=pool, surrogate=surrogate)
    x = (torch.rand(x_shape, generator=gen, dtype=F64) < 0.5).to(F64)
    return layer, x, _random_state(x_shape, out_shape, gen)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("surrogate", SURROGATES)
@pytest.mark.parametrize("kind", ["dense", "conv", "conv_pool"])
def test_autograd_update_equals_closed_form_eq7(kind, surrogate, loss):
    gen = torch.Generator().manual_seed(11)
    layer, x, state0 = _make_layer(kind, surrogate, gen)
    out, state = layer(x, state0)
    n_out = out.s[0].numel()
    readout = LocalReadout(n_out, 4, scale=2.0, generator=gen).double()
    labels = torch.tensor([0, 3, 1])
    y = readout(out.s)
    local_loss(y, labels, loss).backward()

    with torch.no_grad():
        u = out.u.detach()
        # sanity of the setup: some membranes sit where the surrogate is non-zero
        assert (surrogate_derivative(u, "boxcar") > 0).float().mean() > 0.2
        dl_du = closed_form_dl_du(u, y.detach(), labels, readout.g, loss, surrogate)
        p_ref, _ = input_trace_step(x, state0.p, state0.q, layer.params)
        assert torch.equal(state.p, p_ref)
        dw, db = closed_form_weight_grad(layer, state.p, dl_du)
    assert dw.abs().max() > 1e-4  # a non-trivial update
    torch.testing.assert_close(layer.synapse.weight.grad, dw, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(layer.synapse.bias.grad, db, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("surrogate", SURROGATES)
def test_mse_error_is_eq8_and_dense_update_is_its_outer_product_with_p(surrogate):
    """Eq. 8 literally: dW_ij = -eta * mean_b error_i sigma'(U_i) P_j, error_i = sum_k G_ki (Y_k - Yhat_k)."""
    gen = torch.Generator().manual_seed(5)
    layer, x, state0 = _make_layer("dense", surrogate, gen)
    out, state = layer(x, state0)
    readout = LocalReadout(5, 4, scale=2.0, generator=gen).double()
    labels = torch.tensor([2, 2, 0])
    y = readout(out.s)
    local_loss(y, labels, "mse").backward()
    err = eq8_error(y.detach(), labels, readout.g)
    post = surrogate_derivative(out.u.detach(), surrogate)
    B = x.shape[0]
    dw = sum(torch.outer(err[b] * post[b], state.p[b]) for b in range(B)) / B
    torch.testing.assert_close(layer.synapse.weight.grad, dw, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(layer.synapse.bias.grad, (err * post).mean(0), rtol=1e-10, atol=1e-14)


def test_max_pooled_conv_update_reaches_only_the_argmax_positions():
    """Of each pooling window, only the winner's receptive field contributes to dW."""
    gen = torch.Generator().manual_seed(2)
    layer, x, state0 = _make_layer("conv_pool", "fast_sigmoid", gen)
    out, state = layer(x, state0)
    readout = LocalReadout(out.s[0].numel(), 4, generator=gen).double()
    local_loss(readout(out.s), torch.tensor([0, 1, 2]), "mse").backward()
    # The same update computed as if every position of the window received the factor is different.
    with torch.no_grad():
        dl_du = closed_form_dl_du(out.u, readout(out.s), torch.tensor([0, 1, 2]), readout.g, "mse", "fast_sigmoid")
        spread = dl_du.repeat_interleave(2, 2).repeat_interleave(2, 3)
        patches = F.unfold(state.p, 3, padding=1)
        dw_spread = torch.einsum("bol,bcl->oc", spread.flatten(2), patches).reshape(layer.synapse.weight.shape)
    assert not torch.allclose(layer.synapse.weight.grad, dw_spread)
    # and the membrane gradient of the conv output is zero off the argmax
    p = state.p.detach()
    u_full = layer.synapse(p)
    u_full.retain_grad()
    u = layer.pool(u_full) - layer.params.rho * state0.r
    local_loss(readout(spike(u, "fast_sigmoid")), torch.tensor([0, 1, 2]), "mse").backward()
    mask = pool_mask(u_full.detach(), 2)
    assert torch.all(u_full.grad[mask == 0] == 0)
    assert (u_full.grad[mask == 1] != 0).float().mean() > 0.5


def test_regulariser_is_eq9_and_adds_its_membrane_gradient():
    u = torch.randn(4, 6, dtype=F64) * 0.3
    reg = regulariser(u, 0.7, 1.3)
    ref = 0.7 * torch.relu(u + 0.01).mean() + 1.3 * torch.relu(0.1 - u.mean(1)).mean()
    torch.testing.assert_close(reg, ref)
    u.requires_grad_()
    regulariser(u, 0.7, 1.3).backward()
    torch.testing.assert_close(u.grad, dreg_du(u.detach(), 0.7, 1.3))
    assert regulariser(u, 0.0, 0.0).item() == 0.0


def test_local_losses_are_the_documented_ones():
    y = torch.tensor([[0.2, 0.9, -0.5], [2.0, 0.0, 0.1]], dtype=F64)
    labels = torch.tensor([1, 0])
    t = F.one_hot(labels, 3).to(F64)
    assert local_loss(y, labels, "mse").item() == pytest.approx(0.5 * ((y - t) ** 2).sum(1).mean().item())
    d = (y - t).abs()
    huber = torch.where(d < 1, 0.5 * d**2, d - 0.5).mean()
    assert local_loss(y, labels, "smooth_l1").item() == pytest.approx(huber.item())
    with pytest.raises(ValueError, match="loss"):
        local_loss(y, labels, "hinge")
    with pytest.raises(ValueError, match="loss"):
        DecolleRule(build_network(_tiny_cfg(), (2, 8, 8), 4), None, loss="l2")


# --- the rule over sequences -------------------------------------------------------------


def _tiny_cfg(surrogate: str = "boxcar", dropout: float = 0.0) -> NetworkConfig:
    return NetworkConfig(
        layers=[LayerConfig("conv", 3, 3, 2), LayerConfig("conv", 4, 3, 1), LayerConfig("dense", 6)],
        neuron=NeuronConfig(alpha=0.9, beta=0.8, refractory="after_pool", spike_at_zero=True),
        surrogate=surrogate,
        readout_scale=2.0,
        dropout=dropout,
    )


def _tiny_net(surrogate="boxcar", seed=0, gain=3.0):
    net = build_network(_tiny_cfg(surrogate), (2, 8, 8), 4, seed=seed)
    with torch.no_grad():  # a larger gain so that every layer spikes and learns
        for layer in net.layers:
            layer.synapse.weight.mul_(gain)
            layer.synapse.bias.add_(0.1)
    return net


def _inputs(T, B=3, seed=0, rate=0.3):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(B, T, 2, 8, 8, generator=gen) < rate).float()
    labels = torch.randint(0, 4, (B,), generator=gen)
    return x, labels


@pytest.mark.parametrize("surrogate,loss", [("boxcar", "mse"), ("fast_sigmoid", "smooth_l1"), ("sigmoid", "cross_entropy")])
def test_train_sequence_equals_manual_closed_form_updates(surrogate, loss):
    """With plain SGD, train_sequence must apply exactly -lr * (closed-form dW) to every layer at
    every step t >= burn_in, and nothing during the burn-in."""
    T, burn_in, lr, reg1, reg2 = 9, 3, 0.05, 0.2, 0.3
    net = _tiny_net(surrogate)
    ref = copy.deepcopy(net)
    x, labels = _inputs(T)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    rule = DecolleRule(net, opt, loss=loss, reg1=reg1, reg2=reg2, burn_in=burn_in)
    res = rule.train_sequence(x, labels)

    state = None
    n_updates = 0
    loss_sum = torch.zeros(3)
    with torch.no_grad():
        for t in range(T):
            out, new_state = ref(x[:, t], state)
            if t >= burn_in:
                grads = []
                for i, layer in enumerate(ref.layers):
                    g = ref.readouts[i].g
                    dl_du = closed_form_dl_du(out.membranes[i], out.readouts[i], labels, g, loss,
                                              surrogate, reg1, reg2)
                    grads.append(closed_form_weight_grad(layer, new_state[i].p, dl_du))
                    loss_sum[i] += local_loss(out.readouts[i], labels, loss) + regulariser(out.membranes[i], reg1, reg2)
                for layer, (dw, db) in zip(ref.layers, grads):
                    layer.synapse.weight.sub_(lr * dw)
                    layer.synapse.bias.sub_(lr * db)
                n_updates += 1
            state = new_state
    assert n_updates == T - burn_in
    moved = [(a.synapse.weight - b.synapse.weight).abs().max() for a, b in zip(net.layers, _tiny_net(surrogate).layers)]
    assert all(m > 1e-5 for m in moved), moved  # every layer learned something
    for a, b in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.loss, loss_sum / (T - burn_in), rtol=1e-5, atol=1e-7)
    # every sample casts exactly one vote per layer per step after the burn-in
    assert torch.all(res.votes.sum(2) == T - burn_in)


def test_one_optimiser_step_per_time_step_after_burn_in():
    T, burn_in = 8, 5
    net = _tiny_net()
    opt = torch.optim.Adamax(net.parameters(), lr=1e-3, betas=(0.0, 0.95))
    rule = DecolleRule(net, opt, burn_in=burn_in)
    x, labels = _inputs(T)
    rule.train_sequence(x, labels)
    steps = {float(s["step"]) for s in opt.state.values()}
    assert steps == {float(T - burn_in)}


def test_no_update_and_no_graph_during_burn_in():
    """A sequence no longer than the burn-in changes no weight."""
    net = _tiny_net()
    before = copy.deepcopy(net.state_dict())
    rule = DecolleRule(net, torch.optim.SGD(net.parameters(), lr=1.0), burn_in=6)
    x, labels = _inputs(6)
    res = rule.train_sequence(x, labels)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert res.votes.sum() == 0


def test_readouts_never_change_during_training():
    net = _tiny_net()
    g0 = [r.g.clone() for r in net.readouts]
    rule = DecolleRule(net, torch.optim.Adamax(net.parameters(), lr=0.1), burn_in=1)
    rule.train_sequence(*_inputs(6))
    assert all(torch.equal(a, r.g) for a, r in zip(g0, net.readouts))


def test_train_sequence_gradients_are_those_of_each_layer_alone():
    """Summing the layer losses before one backward() gives each layer only its own gradient:
    the gradient of the sum equals, layer by layer, the gradient of that layer's loss alone."""
    net = _tiny_net("fast_sigmoid")
    x, labels = _inputs(4)
    rule = DecolleRule(net, torch.optim.SGD(net.parameters(), lr=0.0), loss="mse", reg1=0.1, reg2=0.1)
    state = None
    for t in range(3):
        with torch.no_grad():
            _, state = net(x[:, t], state)
    out, _ = net(x[:, 3], state)
    losses = rule.layer_losses(out, labels)
    per_layer = []
    for k in range(3):
        grads = torch.autograd.grad(losses[k], list(net.parameters()), retain_graph=True, allow_unused=True)
        per_layer.append(grads)
        own = {id(p) for p in net.layers[k].parameters()}
        for p, gr in zip(net.parameters(), grads):
            if id(p) not in own:
                assert gr is None or torch.all(gr == 0)
            else:
                assert gr is not None and gr.abs().max() > 0
    total = torch.autograd.grad(losses.sum(), list(net.parameters()))
    for i, gt in enumerate(total):
        expected = sum(g[i] for g in per_layer if g[i] is not None)
        torch.testing.assert_close(gt, expected)


def test_predict_sequence_matches_training_forward_without_changing_weights():
    net = _tiny_net()
    x, labels = _inputs(7)
    before = copy.deepcopy(net.state_dict())
    res = predict_sequence(net, x, labels, burn_in=2, loss="mse")
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert torch.all(res.votes.sum(2) == 5)
    # votes are the per-step argmax of the readouts after the burn-in
    state, votes = None, torch.zeros(3, 3, 4)
    with torch.no_grad():
        for t in range(7):
            out, state = net(x[:, t], state)
            if t >= 2:
                for i, y in enumerate(out.readouts):
                    votes[i, torch.arange(3), y.argmax(1)] += 1
    assert torch.equal(res.votes, votes)


def _counted_rates(net, x) -> list[float]:
    """Spikes per neuron per step of every layer, counted step by step on a plain forward."""
    counts, neurons, state = [0] * len(net.layers), [0] * len(net.layers), None
    with torch.no_grad():
        for t in range(x.shape[1]):
            out, state = net(x[:, t], state)
            for i, s in enumerate(out.spikes):
                counts[i] += int(s.sum().item())
                neurons[i] = s.numel()  # batch x neurons of the layer
    return [c / (n * x.shape[1]) for c, n in zip(counts, neurons)]


def _lif_net():
    cfg = NetworkConfig(layers=[LayerConfig("conv", 3, 3, 2), LayerConfig("dense", 6, recurrent=True)],
                        neuron_model="lif", readout_scale=2.0, dropout=0.0)
    cfg.lif.v_th = 0.3
    return build_network(cfg, (2, 8, 8), 4, seed=0)


@pytest.mark.parametrize("rule", ["decolle", "decolle_autograd", "bptt", "bptt_lif", "stllr", "predict"])
def test_rates_are_the_spikes_per_neuron_per_step_of_every_layer(rule):
    """Every rule reports each layer's mean firing rate over the whole sequence, burn-in
    included. With lr 0 the weights stay put, so a plain forward sees the same spikes."""
    from threefactor.rules import BPTTRule, STLLRRule

    net = _lif_net() if rule in ("stllr", "bptt_lif") else _tiny_net()
    x, labels = _inputs(7, rate=0.4)
    expected = _counted_rates(net, x)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    make = {
        "decolle": lambda: DecolleRule(net, opt, burn_in=2),
        "decolle_autograd": lambda: DecolleRule(net, opt, burn_in=2, closed_form=False),
        "bptt": lambda: BPTTRule(net, opt, burn_in=2),
        "bptt_lif": lambda: BPTTRule(net, opt, burn_in=2),
        "stllr": lambda: STLLRRule(net, opt, burn_in=2),
    }
    res = predict_sequence(net, x, labels, burn_in=2) if rule == "predict" else make[rule]().train_sequence(x, labels)
    assert res.rates.shape == (len(net.layers),) and res.rates.dtype == torch.float64
    assert all(0 < r < 1 for r in expected)  # every layer spikes, none saturates: the count is informative
    assert res.rates.tolist() == pytest.approx(expected, rel=1e-12)


# --- memory does not grow with T ---------------------------------------------------------


def _graph_size(t: torch.Tensor) -> int:
    """Number of autograd nodes reachable from ``t``."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(n for n, _ in node.next_functions)
    return len(seen)


class _Saved:
    """A tensor saved for backward; counts how many are alive (not yet freed with their graph)."""

    live = 0

    def __init__(self, t):
        self.t = t
        _Saved.live += 1

    def __del__(self):
        _Saved.live -= 1


def _run_and_measure(T: int):
    """The autograd path (test_closed_form.py has the same property for the closed form)."""
    net = _tiny_net()
    opt = torch.optim.Adamax(net.parameters(), lr=1e-3, betas=(0.0, 0.95))
    rule = DecolleRule(net, opt, burn_in=2, closed_form=False)
    states, graph_sizes, live = [], [], []
    net.register_forward_hook(lambda m, inp, out: states.append(out[1]))
    original = rule.layer_losses

    def measured(out, labels):
        losses = original(out, labels)
        graph_sizes.append(_graph_size(losses))
        live.append(_Saved.live)  # tensors saved for backward that are still held
        return losses

    rule.layer_losses = measured
    x, labels = _inputs(T, B=2)
    _Saved.live = 0
    with torch.autograd.graph.saved_tensors_hooks(_Saved, lambda s: s.t):
        rule.train_sequence(x, labels)
    last = states[-1]
    state_numel = sum(t.numel() for st in last for t in st)
    opt_numel = sum(v.numel() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    return last, state_numel, opt_numel, graph_sizes, live


def test_training_state_and_graph_do_not_grow_with_sequence_length():
    short = _run_and_measure(20)
    long = _run_and_measure(200)
    assert short[1] == long[1] > 0  # NetworkState numel
    assert short[2] == long[2] > 0  # optimiser state numel
    # the state kept across steps carries no graph
    for st in long[0]:
        for t in st:
            assert t.grad_fn is None and not t.requires_grad
    # the graph of every step's loss has the same size: it never reaches back to earlier steps
    assert len(set(short[3] + long[3])) == 1
    # and the tensors held for backward are those of one step only, whatever the step
    assert len(set(short[4] + long[4])) == 1 and short[4][0] > 0
    assert len(long[4]) == 198


def test_memory_probe_detects_a_graph_kept_across_steps():
    """The probe above can fail: without detaching the state, the held graph grows every step."""
    net = _tiny_net()
    x, labels = _inputs(6, B=2)
    rule = DecolleRule(net, torch.optim.SGD(net.parameters(), lr=0.0))
    state, sizes, live = None, [], []
    _Saved.live = 0
    with torch.autograd.graph.saved_tensors_hooks(_Saved, lambda s: s.t):
        for t in range(6):
            out, state = net(x[:, t], state, detach=False)
            losses = rule.layer_losses(out, labels)
            sizes.append(_graph_size(losses))
            live.append(_Saved.live)
            losses.sum().backward(retain_graph=True)
    assert sizes == sorted(sizes) and sizes[-1] > sizes[0]
    assert live[-1] > live[0]


def test_truncated_bptt_updates_once_per_window_and_carries_the_state():
    """window = T is plain BPTT; window = w takes ceil((T - burn-in) / w) optimiser steps, and a
    sequence continued from a returned state is the same as the whole one at once when no
    update happens in between (lr 0)."""
    from threefactor import BPTTRule
    from threefactor.config import load_config

    cfg = load_config(None, ["network.layers.0.channels=4", "network.layers.1.channels=4",
                             "network.layers.2.channels=4", "network.dropout=0"])
    x = (torch.rand(2, 14, 2, 32, 32) < 0.1).float()
    y = torch.tensor([1, 3])

    def rule(window, lr=1e-3):
        torch.manual_seed(0)
        net = build_network(cfg.network, (2, 32, 32), 8, seed=0)
        return BPTTRule(net, torch.optim.SGD(net.parameters(), lr=lr), burn_in=2, window=window)

    whole, windowed = rule(None), rule(12)
    a, b = whole.train_sequence(x, y), windowed.train_sequence(x, y)
    assert a.stats["optimizer_steps"] == b.stats["optimizer_steps"] == 1
    for p, q in zip(whole.network.parameters(), windowed.network.parameters()):
        assert torch.allclose(p, q, atol=1e-7)
    assert rule(5).train_sequence(x, y).stats["optimizer_steps"] == 3  # 12 steps after the burn-in
    frozen = rule(None, lr=0.0)
    first = frozen.train_sequence(x[:, :6], y)
    second = frozen.train_sequence(x[:, 6:], y, state=first.state)
    at_once = rule(None, lr=0.0).train_sequence(x, y)
    assert torch.equal(first.votes + second.votes, at_once.votes)
    with pytest.raises(ValueError, match="window must be >= 1"):
        rule(0)
