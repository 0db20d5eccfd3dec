"""S-TLLR: the online traces equal the brute-force sums over the past, the special case
(alpha_post = 0, lambda_pre = 0) is the instantaneous surrogate gradient, and the rule computes
step for step what the authors' layers compute (a re-implementation written from their source).

SPEC: e_ij[t] = a_pre Psi(u_i[t]) trace_pre_j[t] + a_post x_j[t] trace_post_i[t-1],
trace_pre = l_pre trace_pre + x, trace_post = l_post trace_post + Psi(u);
dW = lr sum_{t >= T_l} delta_i[t] e_ij[t].
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from threefactor.config import ConfigError, LayerConfig, LIFConfig, NetworkConfig, load_config
from threefactor.model.layers import LIFLayer
from threefactor.model.network import DecolleNetwork, build_network
from threefactor.model.neurons import LIFParams, LIFState, lif_psi, lif_spike, lif_step
from threefactor.model.surrogates import LIF_SURROGATES, SURROGATES, surrogate_derivative
from threefactor.rules import STLLRFactors, STLLRRule, make_rule, predict_sequence
from threefactor.rules import local_loss
from threefactor.rules.stllr import eligibility, eligibility_grad, trace_step
from threefactor.run.from_config import make_optimizer

F64 = torch.float64


# --- brute force --------------------------------------------------------------------------


def brute_pre(xs: torch.Tensor, t: int, lam: float) -> torch.Tensor:
    """trace_pre[t] = sum_{k=0}^{t} lam^k x[t-k]."""
    return sum(lam ** k * xs[t - k] for k in range(t + 1))


def brute_post_prev(psis: torch.Tensor, t: int, lam: float) -> torch.Tensor:
    """trace_post[t-1] = sum_{k=1}^{t} lam^(k-1) Psi(u[t-k]) (zero at t = 0)."""
    return sum((lam ** (k - 1) * psis[t - k] for k in range(1, t + 1)), torch.zeros_like(psis[0]))


def brute_eligibility(xs, psis, t, f: STLLRFactors) -> torch.Tensor:
    """e_ij[t] (B, out, in) straight from the definition, as sums over the whole past."""
    pre = brute_pre(xs, t, f.lambda_pre)
    post = brute_post_prev(psis, t, f.lambda_post)
    return f.alpha_pre * psis[t][:, :, None] * pre[:, None, :] + f.alpha_post * post[:, :, None] * xs[t][:, None, :]


factor_values = st.tuples(
    st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.floats(-1.5, 1.5), st.floats(-1.5, 1.5)
).map(lambda v: STLLRFactors(*v))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(1, 12), rate=st.floats(0.05, 0.9), f=factor_values)
def test_online_eligibility_equals_brute_force_sum_over_the_past(seed, T, rate, f):
    gen = torch.Generator().manual_seed(seed)
    B, n_in, n_out = 2, 5, 3
    xs = (torch.rand(T, B, n_in, generator=gen, dtype=F64) < rate).to(F64)
    psis = torch.rand(T, B, n_out, generator=gen, dtype=F64)  # any non-negative Psi(u[t])
    deltas = torch.randn(T, B, n_out, generator=gen, dtype=F64)
    syn = torch.nn.Linear(n_in, n_out, dtype=F64)
    pre, post = torch.zeros(B, n_in, dtype=F64), torch.zeros(B, n_out, dtype=F64)
    dw_online = torch.zeros(n_out, n_in, dtype=F64)
    dw_brute = torch.zeros(n_out, n_in, dtype=F64)
    for t in range(T):
        post_prev = post
        pre, post = trace_step(xs[t], psis[t], pre, post, f)
        torch.testing.assert_close(pre, brute_pre(xs, t, f.lambda_pre), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(post_prev, brute_post_prev(psis, t, f.lambda_post), rtol=1e-10, atol=1e-12)
        e = eligibility(xs[t], psis[t], pre, post_prev, f)
        e_ref = brute_eligibility(xs, psis, t, f)
        torch.testing.assert_close(e, e_ref, rtol=1e-10, atol=1e-12)
        # the rule's update never forms e: delta (x) trace products must give sum_b delta_i e_ij
        dw_online += eligibility_grad(syn, deltas[t], xs[t], psis[t], pre, post_prev, f)
        dw_brute += torch.einsum("bi,bij->ij", deltas[t], e_ref)
    torch.testing.assert_close(dw_online, dw_brute, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("seed", [0, 1])
def test_conv_eligibility_grad_equals_materialised_eligibility(seed):
    """For a convolution, the conv2d_weight form equals sum over positions of delta * e (unfold)."""
    gen = torch.Generator().manual_seed(seed)
    f = STLLRFactors(0.3, 0.6, -0.8, 1.1)
    syn = torch.nn.Conv2d(2, 3, 3, padding=1, dtype=F64)
    B, T = 2, 5
    xs = (torch.rand(T, B, 2, 5, 5, generator=gen, dtype=F64) < 0.4).to(F64)
    psis = torch.rand(T, B, 3, 5, 5, generator=gen, dtype=F64)
    deltas = torch.randn(T, B, 3, 5, 5, generator=gen, dtype=F64)
    pre, post = torch.zeros_like(xs[0]), torch.zeros_like(psis[0])
    dw, dw_ref = torch.zeros_like(syn.weight), torch.zeros_like(syn.weight)
    for t in range(T):
        post_prev = post
        pre, post = trace_step(xs[t], psis[t], pre, post, f)
        dw += eligibility_grad(syn, deltas[t], xs[t], psis[t], pre, post_prev, f)
        pre_u = F.unfold(pre, 3, padding=1)  # (B, C*k*k, L)
        x_u = F.unfold(xs[t], 3, padding=1)
        psi_l, post_l, d_l = psis[t].flatten(2), post_prev.flatten(2), deltas[t].flatten(2)  # (B, O, L)
        e = f.alpha_pre * psi_l[:, :, None, :] * pre_u[:, None] + f.alpha_post * post_l[:, :, None, :] * x_u[:, None]
        dw_ref += torch.einsum("bol,bocl->oc", d_l, e).reshape(syn.weight.shape)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-9, atol=1e-11)


# --- the rule on a network ----------------------------------------------------------------


def _net(kind: str, surrogate: str = "boxcar", seed: int = 0) -> tuple[DecolleNetwork, tuple[int, ...]]:
    if kind == "conv":
        layers = [LayerConfig("conv", 3, 3, 2), LayerConfig("conv", 4, 3, 1), LayerConfig("dense", 5)]
        shape = (2, 6, 6)
    else:
        layers = [LayerConfig("dense", 6, recurrent=True), LayerConfig("dense", 5, recurrent=True)]
        shape = (7,)
    cfg = NetworkConfig(layers=layers, surrogate=surrogate, readout_scale=2.0, neuron_model="lif", dropout=0.0)
    cfg.lif.gamma, cfg.lif.v_th = 0.8, 0.5
    net = build_network(cfg, shape, 4, seed=seed).double()
    with torch.no_grad():  # spread the membranes around the threshold so that Psi is often non-zero
        for layer in net.layers:
            layer.synapse.weight.mul_(2.5)
            layer.synapse.bias.add_(0.1)
    return net, shape


def _inputs(shape, T, B=3, seed=0, rate=0.4):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(B, T, *shape, generator=gen, dtype=F64) < rate).to(F64)
    return x, torch.randint(0, 4, (B,), generator=gen)


def _grads_after_sequence(net, x, labels, **kw) -> dict[str, torch.Tensor]:
    """Run the rule with a zero learning rate; return the gradients it left on the parameters."""
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    STLLRRule(net, opt, **kw).train_sequence(x, labels)
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), learn_steps=st.integers(1, 5), burn_in=st.integers(0, 2),
       f=factor_values, signal=st.sampled_from(["backprop", "local"]))
def test_rule_update_is_sum_over_time_of_delta_times_brute_force_eligibility(seed, learn_steps, burn_in, f, signal):
    """Recurrent dense network, per-sequence accumulation: the gradient the rule applies is
    sum_{t >= T_l} sum_b delta_i[t] e_ij[t], with e from the brute-force sums over the whole past
    of x (or s[t-1] for recurrent synapses, 1 for biases with ``bias_update: synapse``) and Psi(u)."""
    T = burn_in + learn_steps
    net, shape = _net("dense", seed=seed % 3)
    x, labels = _inputs(shape, T, seed=seed)
    got = _grads_after_sequence(net, x, labels, factors=f, psi="boxcar", learning_signal=signal,
                                update="sequence", loss="mse", burn_in=burn_in, bias_update="synapse")

    # reference: record x, s[t-1], Psi(u[t]) and delta[t] per layer, one step at a time
    L = len(net.layers)
    rec = {k: [[] for _ in range(L)] for k in ("x", "s_prev", "psi", "delta")}
    states = [None] * L
    for t in range(T):
        h = x[:, t]
        outs = []
        for i, layer in enumerate(net.layers):
            xin = h if signal == "backprop" else h.detach()
            st_ = states[i] or LIFState(torch.zeros(3, layer.synapse.out_features, dtype=F64),
                                        torch.zeros(3, layer.synapse.out_features, dtype=F64))
            cur = layer.synapse(xin) + layer.recurrent(st_.s)
            out, new = lif_step(cur, st_, layer.params, "boxcar")
            rec["x"][i].append(xin.detach())
            rec["s_prev"][i].append(st_.s)
            rec["psi"][i].append(surrogate_derivative(out.u.detach() - layer.params.v_th, "boxcar"))
            outs.append(out)
            states[i] = LIFState(new.u.detach(), new.s.detach())
            h = out.s
        loss = sum(local_loss(r(o.s), labels, "mse") for r, o in zip(net.readouts, outs))
        for i, d in enumerate(torch.autograd.grad(loss, [o.s for o in outs])):
            rec["delta"][i].append(d)
    for i, layer in enumerate(net.layers):
        xs, sp, ps, ds = (torch.stack(rec[k][i]) for k in ("x", "s_prev", "psi", "delta"))
        ones = torch.ones(T, 3, 1, dtype=F64)
        dw, dv, db = 0, 0, 0
        for t in range(burn_in, T):
            dw = dw + torch.einsum("bi,bij->ij", ds[t], brute_eligibility(xs, ps, t, f))
            dv = dv + torch.einsum("bi,bij->ij", ds[t], brute_eligibility(sp, ps, t, f))
            db = db + torch.einsum("bi,bij->ij", ds[t], brute_eligibility(ones, ps, t, f))[:, 0]
        torch.testing.assert_close(got[f"layers.{i}.synapse.weight"], dw, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(got[f"layers.{i}.recurrent.weight"], dv, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(got[f"layers.{i}.synapse.bias"], db, rtol=1e-8, atol=1e-10)


def _one_step_autograd(net, x, labels, signal, loss_layers="all") -> dict[str, torch.Tensor]:
    """Autograd of the loss of the last step alone, with the state of the earlier steps detached
    (layers connected for backprop, cut for local)."""
    state = None
    with torch.no_grad():
        for t in range(x.shape[1] - 1):
            _, state = net(x[:, t], state)
    out, _ = net(x[:, -1], state, detach=(signal != "backprop"))
    losses = [local_loss(y, labels, "smooth_l1") for y in out.readouts]
    loss = sum(losses) if loss_layers == "all" else losses[-1]
    names, params = zip(*net.named_parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return {n: g for n, g in zip(names, grads) if g is not None}


@pytest.mark.parametrize("surrogate", SURROGATES)
@pytest.mark.parametrize("kind", ["conv", "dense"])
@pytest.mark.parametrize("signal", ["backprop", "local"])
def test_special_case_is_the_instantaneous_surrogate_gradient(kind, surrogate, signal):
    """alpha_post = 0, lambda_pre = 0 (alpha_pre = 1): e_ij = Psi(u_i) x_j, and delta e is exactly
    the autograd gradient of a one-step loss with detached state (conv + max-pool on the
    spikes, dense, recurrent; every surrogate as Psi)."""
    net, shape = _net(kind, surrogate)
    T = 7
    x, labels = _inputs(shape, T, B=8, seed=2)
    ref = _one_step_autograd(copy.deepcopy(net), x, labels, signal)
    f = STLLRFactors(lambda_post=0.37, lambda_pre=0.0, alpha_post=0.0, alpha_pre=1.0)
    got = _grads_after_sequence(net, x, labels, factors=f, psi=surrogate, learning_signal=signal,
                                update="step", burn_in=T - 1)
    assert set(got) == set(ref)
    assert all(g.abs().max() > 0 for g in ref.values())
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-9, atol=1e-12, msg=name)


def test_dfa_sends_the_last_readout_error_through_fixed_random_matrices():
    """Special case with DFA and only the last readout in the loss: hidden layer l gets
    delta_l = e B_l with e = dL/dY of the last readout; the last layer its exact gradient."""
    net, shape = _net("conv")
    T = 4
    x, labels = _inputs(shape, T, seed=5)
    f = STLLRFactors(0.5, 0.0, 0.0, 1.0)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    rule = STLLRRule(net, opt, factors=f, psi="boxcar", learning_signal="dfa", update="step",
                     burn_in=T - 1, loss_layers="last", seed=4)
    rule.train_sequence(x, labels)
    ref_last = _one_step_autograd(copy.deepcopy(net), x, labels, "local", loss_layers="last")
    assert set(ref_last) == {"layers.2.synapse.weight", "layers.2.synapse.bias"}
    torch.testing.assert_close(net.layers[-1].synapse.weight.grad, ref_last["layers.2.synapse.weight"])
    # hidden layers: delta_l = e B_l, then (delta_l * Psi(u))^T x through the conv's weight map
    state = None
    with torch.no_grad():
        for t in range(T - 1):
            _, state = net(x[:, t], state)
        out_last, _ = net(x[:, -1], state)
    y = out_last.readouts[-1].requires_grad_()
    e = torch.autograd.grad(local_loss(y, labels, "smooth_l1"), y)[0]
    h = x[:, -1]
    with torch.no_grad():
        for i in range(2):
            layer = net.layers[i]
            xin = layer.format_input(h)
            out, _ = layer(xin, state[i])
            delta = (e @ rule.feedback[i]).view_as(out.u)
            g = delta * surrogate_derivative(out.u - layer.params.v_th, "boxcar")
            dw = torch.nn.grad.conv2d_weight(xin, layer.synapse.weight.shape, g, padding=1)
            assert dw.abs().max() > 0
            torch.testing.assert_close(layer.synapse.weight.grad, dw, rtol=1e-9, atol=1e-12)
            h = out.s


def test_per_step_updates_change_weights_every_step_after_the_onset():
    net, shape = _net("conv")
    x, labels = _inputs(shape, 7)
    opt = torch.optim.Adamax(net.parameters(), lr=1e-3, betas=(0.0, 0.95))
    res = STLLRRule(net, opt, burn_in=3).train_sequence(x, labels)
    assert {float(s["step"]) for s in opt.state.values()} == {4.0}
    assert res.stats["optimizer_steps"] == 4
    assert torch.all(res.votes.sum(2) == 4)


def test_per_sequence_accumulation_is_one_step_of_the_summed_per_step_gradients():
    """update=sequence applies sum_t delta e once; with fixed weights, that equals the sum of the
    gradients that update=step would compute one by one with a zero learning rate."""
    net, shape = _net("conv")
    x, labels = _inputs(shape, 6)
    acc = _grads_after_sequence(copy.deepcopy(net), x, labels, update="sequence", burn_in=2)
    total = None
    for last in range(3, 7):  # a run whose learning covers only step last-1
        g = _grads_after_sequence(copy.deepcopy(net), x[:, :last], labels, update="step", burn_in=last - 1)
        total = g if total is None else {k: total[k] + g[k] for k in total}
    for k in acc:
        torch.testing.assert_close(acc[k], total[k], rtol=1e-9, atol=1e-12)


def test_lif_step_is_the_soft_or_hard_reset_equation():
    u0, s0 = torch.tensor([0.5, 1.0, -0.2, 0.9]), torch.tensor([0.0, 1.0, 0.0, 1.0])
    cur = torch.tensor([0.4, 0.1, 0.3, 0.25])
    out, st_ = lif_step(cur, LIFState(u0, s0), LIFParams(gamma=0.7, v_th=0.8))
    torch.testing.assert_close(out.u, 0.7 * (u0 - 0.8 * s0) + cur)
    assert torch.equal(out.s, (out.u > 0.8).float())
    assert torch.equal(st_.u, out.u) and torch.equal(st_.s, out.s)
    hard, _ = lif_step(cur, LIFState(u0, s0), LIFParams(gamma=0.7, v_th=0.8, reset="hard"))
    torch.testing.assert_close(hard.u, 0.7 * u0 * (1 - s0) + cur)
    assert not torch.equal(hard.u, out.u)
    with pytest.raises(ValueError, match="reset"):
        lif_step(cur, LIFState(u0, s0), LIFParams(reset="none"))


def test_lif_spikes_strictly_above_the_threshold():
    """The authors' layers spike on u - v_th > 0: a membrane exactly at the threshold is silent."""
    zeros = torch.zeros(3, dtype=F64)
    out, _ = lif_step(torch.tensor([0.5, 0.5 + 1e-12, 0.25], dtype=F64), LIFState(zeros, zeros),
                      LIFParams(gamma=0.5, v_th=0.5))
    assert out.s.tolist() == [0.0, 1.0, 0.0]


@pytest.mark.parametrize("surrogate", LIF_SURROGATES)
def test_lif_spike_derivative_is_psi(surrogate):
    u = torch.tensor([0.6, 0.605, 0.3, 1.1, 1.7, -0.5], dtype=F64, requires_grad=True)
    lif_spike(u, 0.6, surrogate).sum().backward()
    psi = lif_psi(u.detach(), 0.6, surrogate)
    torch.testing.assert_close(u.grad, psi)
    assert psi[0] == psi.max() > 0
    if surrogate in SURROGATES:
        torch.testing.assert_close(psi, surrogate_derivative(u.detach() - 0.6, surrogate))


def test_the_authors_psi_functions_at_known_points():
    """1/(100|u - v_th| + 1)^2 (their dense and recurrent layers), 0.3 max(0, 1 - |u - v_th|)
    (their conv layers)."""
    v_th = 0.6
    u = torch.tensor([0.6, 0.61, 0.57, 1.6, -0.9, 1.1, 0.1], dtype=F64)
    linear = [1.0, 1 / 4, 1 / 16, 1 / 101**2, 1 / 151**2, 1 / 51**2, 1 / 51**2]
    conv = [0.3, 0.3 * 0.99, 0.3 * 0.97, 0.0, 0.0, 0.15, 0.15]
    torch.testing.assert_close(lif_psi(u, v_th, "authors_linear"), torch.tensor(linear, dtype=F64),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(lif_psi(u, v_th, "authors_conv"), torch.tensor(conv, dtype=F64),
                               rtol=1e-12, atol=1e-15)


def test_authors_psi_follows_the_kind_of_layer():
    """``authors``: authors_linear on dense layers, authors_conv on conv layers."""
    p = LIFParams(0.5, 0.6)
    dense = LIFLayer(torch.nn.Linear(3, 2), p, surrogate="authors")
    conv = LIFLayer(torch.nn.Conv2d(1, 2, 3), p, surrogate="sigmoid")
    assert dense.surrogate == "authors_linear" and conv.psi_name("authors") == "authors_conv"
    assert conv.psi_name() == "sigmoid"
    u = torch.tensor([0.6, 0.65, 1.2])
    torch.testing.assert_close(dense.psi(u), lif_psi(u, 0.6, "authors_linear"))
    torch.testing.assert_close(conv.psi(u, "authors"), lif_psi(u, 0.6, "authors_conv"))
    with pytest.raises(ValueError, match="unknown surrogate 'authors_dense'"):
        LIFLayer(torch.nn.Linear(3, 2), p, surrogate="authors_dense")


# --- configs, presets, the factory --------------------------------------------------------


def test_presets_build_and_train_on_synthetic_input():
    shd = load_config("stllr-shd", ["data.timesteps=6", "rule.burn_in=2"])
    assert shd.rule.name == "stllr" and shd.network.neuron_model == "lif"
    assert list(shd.rule.stllr.factors) == [0.5, 1.0, 1.0, 1.0]
    assert shd.network.layers[0].recurrent and shd.network.layers[0].channels == 450
    net = build_network(shd.network, (700,), 20, seed=0)
    rule = make_rule(shd, net, make_optimizer(shd, net))
    x = (torch.rand(2, 6, 700) < 0.05).float()
    res = rule.train_sequence(x, torch.tensor([3, 17]))
    assert res.votes.shape == (len(net.layers), 2, 20) and torch.isfinite(res.loss).all()

    dvs = load_config("stllr-dvsgesture", ["data.timesteps=4", "rule.burn_in=1"])
    assert list(dvs.rule.stllr.factors) == [0.2, 0.75, -1.0, 1.0]
    net = build_network(dvs.network, (2, 32, 32), 11, seed=0)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) >= 6
    rule = make_rule(dvs, net, make_optimizer(dvs, net))
    for cfg in (shd, dvs):  # the authors' Psi, bias update and reset
        assert cfg.rule.stllr.psi == "authors" and cfg.rule.stllr.bias_update == "psi_delta"
        assert cfg.network.lif.reset == "soft"
    assert [layer.psi_name(rule.psi) for layer in net.layers] == ["authors_conv"] * 8 + ["authors_linear"]
    res = rule.train_sequence((torch.rand(1, 4, 2, 32, 32) < 0.05).float(), torch.tensor([5]))
    assert res.votes.shape == (len(net.layers), 1, 11)


def test_predict_sequence_works_for_the_lif_network():
    net, shape = _net("conv")
    x, labels = _inputs(shape, 7)
    res = predict_sequence(net, x, labels, burn_in=2)
    assert torch.all(res.votes.sum(2) == 5)
    state, votes = None, torch.zeros(3, 3, 4, dtype=F64)
    with torch.no_grad():
        for t in range(7):
            out, state = net(x[:, t], state)
            if t >= 2:
                for i, y in enumerate(out.readouts):
                    votes[i, torch.arange(3), y.argmax(1)] += 1
    assert torch.equal(res.votes, votes)


def test_stllr_needs_the_lif_network_and_says_so():
    with pytest.raises(ConfigError, match="neuron_model"):
        load_config(None, ["rule.name=stllr"])
    with pytest.raises(ConfigError, match="recurrent"):
        load_config(None, ["network.layers.0.recurrent=true", "network.neuron_model=lif"])
    with pytest.raises(ValueError, match="LIF"):
        net = build_network(NetworkConfig(), (2, 8, 8), 4)
        STLLRRule(net, torch.optim.SGD(net.parameters(), lr=0.1))


def test_lif_layer_pools_spikes_after_the_neurons():
    layer = LIFLayer(torch.nn.Conv2d(2, 3, 3, padding=1), LIFParams(0.9, 0.2), pool=2)
    out, st_ = layer(torch.rand(4, 2, 8, 8))
    assert out.u.shape == out.s_neurons.shape == (4, 3, 8, 8)
    assert out.s.shape == (4, 3, 4, 4)
    assert torch.equal(out.s, F.max_pool2d(out.s_neurons, 2))


# --- the authors' layers, re-implemented from their source ---------------------------------
# Written from a reading of mapolinario94/S-TLLR, models/layers/STLLR_layers.py (LinearSTLLR,
# LinearRecSTLLR, Conv2dSTLLR and the autograd Functions they call), not copied. One step of a
# layer with input x and state (mem, trace_in, trace_out; trace_in_rec and s_prev if recurrent):
#   trace_in <- l_pre trace_in + x                         (updated before it is used)
#   mem <- sigmoid(leak) mem + W x + b (+ V s_prev)        (mem as left by the previous reset)
#   u_thr = mem - max(threshold, 0.5);  s = [u_thr > 0];  psi = Psi(u_thr)
#   backward of grad_out = dL/ds:  g = psi grad_out;  grad_x = g W (the transposed conv)
#     grad_W = a_post (grad_out trace_out)^T x + a_pre g^T trace_in;  grad_b = sum g
#     grad_V = a_post (grad_out trace_out)^T s_prev + a_pre g^T trace_in_rec
#   with trace_out and trace_in_rec of the previous step; then
#   trace_out <- l_post trace_out + psi;  trace_in_rec <- l_pre trace_in_rec + s
#   mem <- mem - max(threshold, 0.5) s (soft reset) or mem (1 - s) (hard reset).
# Psi is 1/(100|u_thr| + 1)^2 in their dense and recurrent layers, 0.3 max(0, 1 - |u_thr|) in
# their conv layers. Their networks max-pool the spikes after a layer (VGG) and backpropagate
# the learning signal of the loss through the layers at each step (feedback mode BP).
# Their weight standardisation (get_weight) is not part of the neuron or the rule: what is
# compared is the update of the weight the layer applies.


def _conv_weight_grad(g: torch.Tensor, z: torch.Tensor, shape: torch.Size, padding: int) -> torch.Tensor:
    """sum_b g_b (*) z_b for a stride-1 convolution, from unfolded patches."""
    cols = F.unfold(z, shape[2:], padding=padding)  # (B, C_in k k, L)
    return torch.einsum("bol,bil->oi", g.flatten(2), cols).view(shape)


class AuthorsLayer:
    """One of the authors' S-TLLR layers in float64, driven one step at a time."""

    def __init__(self, weight, bias, weight_rec, leak, threshold, factors, reset, padding=0):
        self.w, self.b, self.v = weight, bias, weight_rec
        self.conv = weight.dim() == 4
        self.padding = padding
        self.leak = torch.sigmoid(torch.tensor(leak, dtype=F64))
        self.thr = max(threshold, 0.5)
        self.l_post, self.l_pre, self.a_post, self.a_pre = factors
        self.reset = reset
        self.mem = None

    def psi(self, u_thr):
        if self.conv:
            ramp = 1.0 - u_thr.abs()
            return 0.3 * torch.where(ramp > 0, ramp, torch.zeros_like(ramp))
        return (100.0 * u_thr.abs() + 1.0) ** -2

    def forward(self, x):
        if self.conv:
            cur = F.conv2d(x, self.w, None, padding=self.padding) + self.b.view(1, -1, 1, 1)
        else:
            cur = x @ self.w.t() + self.b
        if self.mem is None:
            self.mem, self.trace_in = torch.zeros_like(cur), torch.zeros_like(x)
            self.trace_out = torch.zeros_like(cur)
            self.trace_in_rec, self.s_prev = torch.zeros_like(cur), torch.zeros_like(cur)
        self.trace_in = self.l_pre * self.trace_in + x
        if self.v is not None:
            cur = cur + self.s_prev @ self.v.t()
        mem = self.leak * self.mem + cur
        u_thr = mem - self.thr
        s = (u_thr > 0).to(F64)
        psi = self.psi(u_thr)
        self.saved = (x, self.trace_in, self.trace_out, psi, self.s_prev, self.trace_in_rec)
        self.trace_out = self.l_post * self.trace_out + psi
        self.trace_in_rec = self.l_pre * self.trace_in_rec + s
        self.s_prev = s
        self.mem = mem - self.thr * s if self.reset == "soft" else mem * (1.0 - s)
        return s, mem

    def backward(self, grad_out):
        """(dL/dx, {name: the layer's update}) for the learning signal ``grad_out`` = dL/ds."""
        x, trace_in, trace_out_prev, psi, s_prev, trace_in_rec_prev = self.saved
        g = psi * grad_out
        post = grad_out * trace_out_prev
        if self.conv:
            dw = (self.a_post * _conv_weight_grad(post, x, self.w.shape, self.padding)
                  + self.a_pre * _conv_weight_grad(g, trace_in, self.w.shape, self.padding))
            grads = {"synapse.weight": dw, "synapse.bias": g.sum((0, 2, 3))}
            grad_x = F.conv_transpose2d(g, self.w, padding=self.padding)
        else:
            grads = {"synapse.weight": self.a_post * post.t() @ x + self.a_pre * g.t() @ trace_in,
                     "synapse.bias": g.sum(0)}
            grad_x = g @ self.w
        if self.v is not None:
            grads["recurrent.weight"] = self.a_post * post.t() @ s_prev + self.a_pre * g.t() @ trace_in_rec_prev
        return grad_x, grads


class _Recorder(torch.optim.Optimizer):
    """Keeps the gradients the rule hands to every optimiser step and changes no weight."""

    def __init__(self, net):
        self.names = {p: n for n, p in net.named_parameters()}
        super().__init__(list(self.names), {})
        self.steps: list[dict[str, torch.Tensor]] = []

    def step(self, closure=None):
        self.steps.append({self.names[p]: p.grad.clone() for p in self.names if p.grad is not None})


AUTHORS_NETS = {  # layer stack, input shape; each as in the authors' models of that kind
    "linear": ([LayerConfig("dense", 6), LayerConfig("dense", 5)], (7,)),
    "recurrent": ([LayerConfig("dense", 6, recurrent=True), LayerConfig("dense", 5)], (7,)),
    "conv": ([LayerConfig("conv", 3, 3, 2), LayerConfig("conv", 4, 3, 1), LayerConfig("dense", 5)], (2, 6, 6)),
}


def _authors_case(kind, leak, threshold, reset, factors, seed=0):
    """Our network (psi ``authors``) and the authors' layers with the same weights."""
    layers, shape = AUTHORS_NETS[kind]
    gamma = torch.sigmoid(torch.tensor(leak, dtype=F64)).item()
    cfg = NetworkConfig(layers=layers, surrogate="sigmoid", readout_scale=2.0, neuron_model="lif",
                        dropout=0.0, init="default",
                        lif=LIFConfig(gamma=gamma, v_th=max(threshold, 0.5), reset=reset))
    net = build_network(cfg, shape, 4, seed=seed).double()
    ref = []
    with torch.no_grad():  # membranes spread around the threshold, so that every layer spikes
        for layer in net.layers:
            layer.synapse.weight.mul_(3.0)
            layer.synapse.bias.add_(0.2)
            if layer.recurrent is not None:
                layer.recurrent.weight.mul_(2.0)
            rec = None if layer.recurrent is None else layer.recurrent.weight.clone()
            ref.append(AuthorsLayer(layer.synapse.weight.clone(), layer.synapse.bias.clone(), rec,
                                    leak, threshold, factors, reset, padding=1 if kind == "conv" else 0))
    return net, ref, shape


def _authors_run(ref, pools, readout, x, labels, burn_in):
    """Per step t >= burn_in the updates of every layer (their backward, BP feedback); per step
    the membranes and the layers' outputs."""
    updates, membranes, outputs = [], [], []
    for t in range(x.shape[1]):
        h, links, us, outs = x[:, t], [], [], []
        for layer, pool in zip(ref, pools):
            if not layer.conv:
                h = h.flatten(1)
            s, u = layer.forward(h.detach())
            s_req = s.clone().requires_grad_()
            out = F.max_pool2d(s_req, pool) if pool > 1 else s_req
            links.append((s_req, out))
            us.append(u)
            outs.append(out.detach())
            h = out
        membranes.append(us)
        outputs.append(outs)
        if t < burn_in:
            continue
        s_last = links[-1][1]
        delta = torch.autograd.grad(local_loss(readout(s_last), labels, "cross_entropy"), s_last)[0]
        step = {}
        for i in range(len(ref) - 1, -1, -1):
            grad_x, grads = ref[i].backward(delta)
            step.update({f"layers.{i}.{k}": v for k, v in grads.items()})
            if i > 0:
                s_req, out = links[i - 1]
                delta = torch.autograd.grad(out, s_req, grad_x.view_as(out))[0]
        updates.append(step)
    return updates, membranes, outputs


AUTHORS_CASES = [
    # kind, leak (gamma = sigmoid(leak)), threshold, reset: leak 0 is their VGG's, 5 their SHD net's
    *[(k, leak, 0.6, r) for k, leak in (("linear", 5.0), ("recurrent", 5.0), ("conv", 0.0))
      for r in ("soft", "hard")],
    ("recurrent", 2.0, 0.3, "soft"),  # a threshold below 0.5 acts as 0.5 in their layers
    ("conv", 2.0, 0.3, "soft"),
]


@pytest.mark.parametrize("f", [STLLRFactors(0.2, 0.75, -1.0, 1.0), STLLRFactors(0.5, 1.0, 1.0, 1.0)],
                         ids=["vision", "shd"])
@pytest.mark.parametrize("kind,leak,threshold,reset", AUTHORS_CASES)
def test_rule_computes_what_the_authors_layers_compute_step_for_step(kind, leak, threshold, reset, f):
    """psi ``authors``, bias_update ``psi_delta``, backprop signal from the last layer's loss:
    every step's weight and bias updates (and the membranes and spikes) equal those of the
    authors' layers with the same weights, inputs and error signal, in float64, to 1e-9 of the
    parameter's largest update (measured: below 1e-15 of it)."""
    net, ref, shape = _authors_case(kind, leak, threshold, reset, f)
    T, burn_in, B = 10, 2, 8
    x, labels = _inputs(shape, T, B=B, seed=11, rate=0.5)
    pools = [layer.pool.kernel_size if layer.pool is not None else 1 for layer in net.layers]
    want, membranes, outputs = _authors_run(ref, pools, net.readouts[-1], x, labels, burn_in)

    state = None
    with torch.no_grad():
        for t in range(T):
            out, state = net(x[:, t], state)
            for i in range(len(net.layers)):
                torch.testing.assert_close(out.membranes[i], membranes[t][i], rtol=0, atol=1e-12)
                assert torch.equal(out.spikes[i], outputs[t][i])
    assert all(sum(o[i].sum() for o in outputs) > 0 for i in range(len(net.layers)))

    opt = _Recorder(net)
    STLLRRule(net, opt, factors=f, psi="authors", learning_signal="backprop", update="step",
              loss="cross_entropy", burn_in=burn_in, loss_layers="last", bias_update="psi_delta",
              ).train_sequence(x, labels)
    assert len(opt.steps) == len(want) == T - burn_in
    assert all(set(got_t) == set(want_t) for got_t, want_t in zip(opt.steps, want))
    for name in want[0]:
        scale = max(step[name].abs().max().item() for step in want)
        assert scale > 1e-5, name  # every parameter gets a non-trivial update
        diff = max((g[name] - w[name]).abs().max().item() for g, w in zip(opt.steps, want))
        assert diff <= 1e-9 * scale, f"{name}: max |difference| {diff:.3g}, largest update {scale:.3g}"


def test_bias_update_options_differ_as_defined():
    """psi_delta is sum Psi delta; synapse adds the trace of the constant input and alpha_post's
    term. Same run, same weights: the weight updates agree, the bias updates do not."""
    net, shape = _net("conv")
    x, labels = _inputs(shape, 5)
    f = STLLRFactors(0.5, 0.8, -0.7, 1.3)
    kw = dict(factors=f, update="sequence", burn_in=1)
    a = _grads_after_sequence(copy.deepcopy(net), x, labels, bias_update="psi_delta", **kw)
    b = _grads_after_sequence(copy.deepcopy(net), x, labels, bias_update="synapse", **kw)
    for name in a:
        if name.endswith("bias"):
            assert (a[name] - b[name]).abs().max() > 1e-6, name
        else:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    with pytest.raises(ValueError, match="bias_update"):
        STLLRRule(net, torch.optim.SGD(net.parameters(), lr=0.1), bias_update="trace")


def test_psi_is_also_the_derivative_through_which_the_learning_signal_crosses_layers():
    """With a backpropagated signal the hidden layer's update depends on the rule's Psi, not on
    the network's surrogate: two networks that differ only in network.surrogate get equal updates."""
    a, shape = _net("conv", surrogate="boxcar")
    b, _ = _net("conv", surrogate="sigmoid")
    x, labels = _inputs(shape, 5)
    kw = dict(psi="authors", update="sequence", burn_in=1, loss_layers="last")
    ga, gb = _grads_after_sequence(a, x, labels, **kw), _grads_after_sequence(b, x, labels, **kw)
    assert ga["layers.0.synapse.weight"].abs().max() > 0
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=0, atol=0)


def test_config_options_reach_the_network_and_the_rule():
    cfg = load_config(None, ["rule.name=stllr", "network.neuron_model=lif", "rule.reg1=0", "rule.reg2=0",
                             "rule.stllr.psi=authors", "rule.stllr.bias_update=synapse",
                             "network.lif.reset=hard"])
    net = build_network(cfg.network, (2, 8, 8), 4)
    assert all(layer.params.reset == "hard" for layer in net.layers)
    rule = make_rule(cfg, net, make_optimizer(cfg, net))
    assert rule.psi == "authors" and rule.bias_update == "synapse"
    for key, value in (("rule.stllr.psi", "authors_dense"), ("rule.stllr.bias_update", "trace"),
                       ("network.lif.reset", "zero")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [f"{key}={value}"])
