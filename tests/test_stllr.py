"""S-TLLR: the online traces equal the brute-force sums over the past, and the special case
(alpha_post = 0, lambda_pre = 0) is the instantaneous surrogate gradient.

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

from threefactor.config import LayerConfig, NetworkConfig, load_config
from threefactor.layers import LIFLayer
from threefactor.network import LIFNetwork, build_network
from threefactor.neurons import SURROGATES, LIFParams, LIFState, lif_step, spike, surrogate_derivative
from threefactor.rules import STLLRFactors, STLLRRule, make_rule, predict_sequence
from threefactor.rules.decolle import local_loss
from threefactor.rules.stllr import eligibility, eligibility_grad, trace_step
from threefactor.train import make_optimizer

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


def _net(kind: str, surrogate: str = "boxcar", seed: int = 0) -> tuple[LIFNetwork, tuple[int, ...]]:
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
    of x (or s[t-1] for recurrent synapses, 1 for biases) and Psi(u)."""
    T = burn_in + learn_steps
    net, shape = _net("dense", seed=seed % 3)
    x, labels = _inputs(shape, T, seed=seed)
    got = _grads_after_sequence(net, x, labels, factors=f, psi="boxcar", learning_signal=signal,
                                update="sequence", loss="mse", burn_in=burn_in)

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
    rule = STLLRRule(net, opt, factors=f, learning_signal="dfa", update="step", burn_in=T - 1,
                     loss_layers="last", seed=4)
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


def test_lif_step_is_the_soft_reset_equation():
    p = LIFParams(gamma=0.7, v_th=0.8)
    u0, s0 = torch.tensor([0.5, 1.0, -0.2]), torch.tensor([0.0, 1.0, 0.0])
    cur = torch.tensor([0.4, 0.1, 0.3])
    out, st_ = lif_step(cur, LIFState(u0, s0), p)
    torch.testing.assert_close(out.u, 0.7 * (u0 - 0.8 * s0) + cur)
    assert torch.equal(out.s, (out.u - 0.8 >= 0).float())
    assert torch.equal(st_.u, out.u) and torch.equal(st_.s, out.s)
    u = torch.tensor([0.81, 0.3], requires_grad=True)
    spike(u - 0.8, "fast_sigmoid").sum().backward()
    torch.testing.assert_close(u.grad, surrogate_derivative(u.detach() - 0.8, "fast_sigmoid"))


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
    from threefactor.config import ConfigError

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
