"""Neuron dynamics (SPEC "DECOLLE, exactly", Eq. 4) and the spike / surrogate functions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from threefactor.model.layers import DecolleLayer
from threefactor.model.neurons import (
    DecolleParams,
    DecolleState,
    decolle_step,
    detach_state,
    initial_decolle_state,
    input_trace_step,
)
from threefactor.model.surrogates import SURROGATES, spike, surrogate_derivative

F64 = torch.float64


# --- spike and surrogates -----------------------------------------------------------


def _reference_derivative(u: torch.Tensor, kind: str) -> torch.Tensor:
    """The three surrogates written out independently of the library."""
    if kind == "boxcar":  # 1 on [-0.5, 0.5], 0 elsewhere (the paper)
        return torch.where((u >= -0.5) & (u <= 0.5), 1.0, 0.0).to(u.dtype)
    if kind == "fast_sigmoid":  # 1 / (10 |u| + 1)^2
        return 1.0 / (10.0 * u.abs() + 1.0) ** 2
    if kind == "sigmoid":  # logistic'(u) = e^-u / (1 + e^-u)^2
        return torch.exp(-u) / (1.0 + torch.exp(-u)) ** 2
    raise AssertionError(kind)


def _probe_points() -> torch.Tensor:
    eps = 1e-12
    special = [0.0, -0.0, eps, -eps, 0.5, -0.5, 0.5 + eps, -0.5 - eps, 0.5 - eps, 3.0, -3.0]
    return torch.cat([torch.tensor(special, dtype=F64), torch.linspace(-2, 2, 401, dtype=F64)])


def test_surrogate_list_is_the_three_of_the_spec():
    assert set(SURROGATES) == {"boxcar", "fast_sigmoid", "sigmoid"}


def test_spike_forward_is_heaviside_at_u_ge_0():
    u = _probe_points()
    for kind in SURROGATES:
        s = spike(u, kind)
        assert s.dtype == u.dtype
        assert torch.equal(s, (u >= 0).to(F64)), kind
    # the exact boundary fires; anything below does not
    assert spike(torch.tensor([0.0]), "boxcar").item() == 1.0
    assert spike(torch.tensor([-1e-30]), "boxcar").item() == 0.0
    assert spike(torch.tensor([-0.0]), "sigmoid").item() == 1.0
    # float32 input stays float32 (so a float32 network does not silently upcast)
    assert spike(torch.zeros(3), "fast_sigmoid").dtype == torch.float32


@pytest.mark.parametrize("kind", SURROGATES)
def test_surrogate_derivative_closed_form(kind):
    u = _probe_points()
    assert torch.allclose(surrogate_derivative(u, kind), _reference_derivative(u, kind), atol=1e-15)


def test_boxcar_boundaries_are_inclusive():
    u = torch.tensor([-0.5, 0.5, -0.5000001, 0.5000001], dtype=F64)
    assert surrogate_derivative(u, "boxcar").tolist() == [1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("kind", SURROGATES)
def test_spike_backward_equals_surrogate_derivative(kind):
    u = _probe_points().requires_grad_()
    upstream = torch.randn(u.shape, dtype=F64)
    (spike(u, kind) * upstream).sum().backward()
    assert torch.allclose(u.grad, upstream * surrogate_derivative(u.detach(), kind), atol=1e-15)


def test_surrogates_differ_from_each_other():
    u = torch.linspace(-1, 1, 21, dtype=F64)
    d = [surrogate_derivative(u, k) for k in SURROGATES]
    for i in range(len(d)):
        for j in range(i + 1, len(d)):
            assert not torch.allclose(d[i], d[j])


@pytest.mark.parametrize("bad", ["foo", "Boxcar", "heaviside", ""])
def test_unknown_surrogate_raises_value_error(bad):
    with pytest.raises(ValueError, match="surrogate"):
        spike(torch.zeros(2), bad)
    with pytest.raises(ValueError, match="surrogate"):
        surrogate_derivative(torch.zeros(2), bad)


# --- parameters ---------------------------------------------------------------------


def test_default_decays_are_those_of_the_authors_code():
    p = DecolleParams()
    assert (p.alpha, p.beta, p.gamma, p.rho) == (0.97, 0.92, 0.65, 1.0)


def test_from_taus_gives_exp_minus_dt_over_tau():
    p = DecolleParams.from_taus(tau_mem=20e-3, tau_syn=5e-3, tau_ref=2e-3, dt=1e-3, rho=0.5,
                                ordering="lagged")
    assert p.alpha == pytest.approx(math.exp(-1 / 20))
    assert p.beta == pytest.approx(math.exp(-1 / 5))
    assert p.gamma == pytest.approx(math.exp(-1 / 2))
    assert (p.rho, p.ordering) == (0.5, "lagged")
    with pytest.raises(ValueError, match="tau_syn"):
        DecolleParams.from_taus(20e-3, 0.0, 2e-3)


# --- traces: closed-form exponential filtering ----------------------------------------


def _filter(x: np.ndarray, decay: float) -> np.ndarray:
    """y[t] = sum_{k <= t} (1 - decay) decay^(t - k) x[k], written as an explicit sum."""
    T = x.shape[0]
    y = np.zeros_like(x)
    for t in range(T):
        for k in range(t + 1):
            y[t] += (1 - decay) * decay ** (t - k) * x[k]
    return y


def _shift(x: np.ndarray) -> np.ndarray:
    """x[t - 1], with zero before the start."""
    return np.concatenate([np.zeros_like(x[:1]), x[:-1]])


spike_trains = st.integers(1, 25).flatmap(
    lambda T: st.lists(st.lists(st.sampled_from([0.0, 1.0]), min_size=3, max_size=3),
                       min_size=T, max_size=T)
)
decays = st.floats(0.0, 0.99, allow_nan=False)


@settings(max_examples=40, deadline=None)
@given(x=spike_trains, alpha=decays, beta=decays, ordering=st.sampled_from(["current", "lagged"]))
def test_traces_are_closed_form_filters_of_the_input(x, alpha, beta, ordering):
    x = np.asarray(x, dtype=np.float64)  # (T, N)
    params = DecolleParams(alpha=alpha, beta=beta, ordering=ordering)
    p = q = torch.zeros(1, x.shape[1], dtype=F64)
    ps, qs = [], []
    for t in range(x.shape[0]):
        p, q = input_trace_step(torch.from_numpy(x[t])[None], p, q, params)
        ps.append(p[0].numpy())
        qs.append(q[0].numpy())
    q_ref = _filter(x, beta)
    p_ref = _filter(q_ref if ordering == "current" else _shift(q_ref), alpha)
    np.testing.assert_allclose(np.stack(qs), q_ref, atol=1e-12)
    np.testing.assert_allclose(np.stack(ps), p_ref, atol=1e-12)


def test_current_ordering_reaches_p_in_the_same_step_lagged_one_step_later():
    params = dict(alpha=0.5, beta=0.5)
    x = torch.ones(1, 1, dtype=F64)
    z = torch.zeros(1, 1, dtype=F64)
    p, q = input_trace_step(x, z, z, DecolleParams(**params, ordering="current"))
    assert (p.item(), q.item()) == (0.25, 0.5)
    p, q = input_trace_step(x, z, z, DecolleParams(**params, ordering="lagged"))
    assert (p.item(), q.item()) == (0.0, 0.5)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    T=st.integers(1, 20),
    gamma=decays,
    rho=st.floats(0.0, 3.0),
    ordering=st.sampled_from(["current", "lagged"]),
)
def test_decolle_step_membrane_and_refractory_trace(seed, T, gamma, rho, ordering):
    """U[t] = W P[t] + b - rho R[t-1], S = [U >= 0], R[t] = filter_gamma(S)[t]."""
    gen = torch.Generator().manual_seed(seed)
    n_in, n_out = 5, 4
    x = (torch.rand(T, 2, n_in, generator=gen) < 0.4).to(F64)
    syn = nn.Linear(n_in, n_out, dtype=F64)
    with torch.no_grad():
        syn.weight.copy_(torch.randn(n_out, n_in, generator=gen, dtype=F64) * 3)
        syn.bias.copy_(torch.randn(n_out, generator=gen, dtype=F64) * 0.5)
    params = DecolleParams(alpha=0.8, beta=0.7, gamma=gamma, rho=rho, ordering=ordering)
    layer = DecolleLayer(syn, params, surrogate="boxcar")
    state = initial_decolle_state(x[0], (2, n_out))  # explicit: see the float64 test below
    ps, us, ss, rs = [], [], [], []
    with torch.no_grad():
        for t in range(T):
            out, state = layer(x[t], state)
            ps.append(state.p)
            us.append(out.u)
            ss.append(out.s)
            rs.append(state.r)
    P, U, S, R = (torch.stack(a).numpy() for a in (ps, us, ss, rs))
    np.testing.assert_array_equal(S, (U >= 0).astype(np.float64))
    R_ref = _filter(S, gamma)
    np.testing.assert_allclose(R, R_ref, atol=1e-12)
    W, b = syn.weight.detach().numpy(), syn.bias.detach().numpy()
    U_ref = P @ W.T + b - rho * _shift(R_ref)
    np.testing.assert_allclose(U, U_ref, atol=1e-12)


def test_max_pool_acts_on_the_membrane_before_the_spike_and_refractory_after():
    """U = maxpool(conv(P) + b) - rho R: R has the pooled shape and is subtracted after pooling."""
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 3, 3, padding=1, dtype=F64)
    params = DecolleParams(rho=0.7, refractory="after_pool", spike_at_zero=True)
    layer = DecolleLayer(conv, params, pool=2)
    x = (torch.rand(2, 2, 6, 6) < 0.5).to(F64)
    state0 = initial_decolle_state(x, (2, 3, 3, 3))
    state0 = DecolleState(torch.rand_like(state0.p), torch.rand_like(state0.q), torch.rand_like(state0.r))
    out, state = layer(x, state0)
    p, _ = input_trace_step(x, state0.p, state0.q, params)
    u_full = conv(p)
    windows = u_full.unfold(2, 2, 2).unfold(3, 2, 2).reshape(2, 3, 3, 3, 4)
    u_ref = windows.max(-1).values - 0.7 * state0.r
    assert out.u.shape == (2, 3, 3, 3) == state.r.shape
    assert torch.allclose(out.u, u_ref, atol=1e-12)
    assert torch.equal(out.s, (u_ref >= 0).to(F64))
    assert DecolleLayer(nn.Conv2d(2, 3, 3, padding=1), pool=2).output_shape((2, 6, 6)) == (3, 3, 3)


def test_initial_state_is_zero_with_input_shaped_traces():
    x = torch.rand(3, 2, 4, 4)
    s = initial_decolle_state(x, (3, 5, 2, 2))
    assert s.p.shape == s.q.shape == x.shape and s.r.shape == (3, 5, 2, 2)
    assert all(float(t.abs().sum()) == 0 for t in s)
    assert s.p.data_ptr() != s.q.data_ptr()  # distinct buffers


def test_detach_state_cuts_the_graph():
    w = torch.ones(3, requires_grad=True)
    state = DecolleState(w * 2, w * 3, w * 4)
    assert all(t.grad_fn is not None for t in state)
    cut = detach_state(state)
    assert all(t.grad_fn is None and not t.requires_grad for t in cut)
    assert all(torch.equal(a, b) for a, b in zip(cut, state))


def test_decolle_step_without_pool_equals_layer_forward():
    torch.manual_seed(1)
    syn = nn.Linear(4, 3, dtype=F64)
    params = DecolleParams(ordering="lagged")
    x = (torch.rand(2, 4) < 0.5).to(F64)
    st0 = DecolleState(torch.rand(2, 4, dtype=F64), torch.rand(2, 4, dtype=F64), torch.rand(2, 3, dtype=F64))
    a, sa = decolle_step(x, st0, params, syn, None, "sigmoid")
    b, sb = DecolleLayer(syn, params, surrogate="sigmoid")(x, st0)
    assert all(torch.equal(i, j) for i, j in zip(a + sa, b + sb))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_layer_creates_its_initial_state_in_the_dtype_of_its_weights(dtype):
    """A float64 layer (as used for exact gradient checks) must run from ``state=None``."""
    for syn, x in ((nn.Linear(3, 2, dtype=dtype), torch.ones(4, 3, dtype=dtype)),
                   (nn.Conv2d(2, 3, 3, padding=1, dtype=dtype), torch.ones(4, 2, 5, 5, dtype=dtype))):
        out, state = DecolleLayer(syn, pool=1)(x)
        assert out.u.dtype == out.s.dtype == dtype
        assert all(t.dtype == dtype for t in state)
        assert DecolleLayer(syn).output_shape(tuple(x.shape[1:])) == tuple(out.u.shape[1:])


@pytest.mark.parametrize("spike_at_zero", [True, False])
def test_refractory_before_the_pool_follows_each_neuron_of_the_pool(spike_at_zero):
    """R per unpooled neuron, driven by its own spikes; the layer spikes on maxpool(V - rho R)."""
    v = torch.tensor([[[[1.0, 0.5], [-1.0, -2.0]]]])  # W P + b of one 2 x 2 pool, every step
    params = DecolleParams(gamma=0.5, rho=1.0, refractory="before_pool", spike_at_zero=spike_at_zero)
    x = torch.zeros(1, 1, 2, 2)
    state = DecolleState(x, x.clone(), torch.zeros(1, 1, 2, 2))
    pool = torch.nn.MaxPool2d(2)
    out, state = decolle_step(x, state, params, lambda p: v, pool)
    assert out.u.item() == 1.0 and out.s.item() == 1.0
    assert state.r.tolist() == [[[[0.5, 0.5], [0.0, 0.0]]]]  # both neurons above 0 fired
    out, state = decolle_step(x, state, params, lambda p: v, pool)
    assert out.u.item() == 0.5 and out.s.item() == 1.0  # maxpool([0.5, 0, -1, -2])
    second = 0.5 if spike_at_zero else 0.0  # the neuron at exactly 0 fires only with spike_at_zero
    assert state.r.tolist() == [[[[0.75, 0.25 + second], [0.0, 0.0]]]]


def test_refractory_after_the_pool_follows_the_pooled_unit():
    v = torch.tensor([[[[1.0, 0.5], [-1.0, -2.0]]]])
    params = DecolleParams(gamma=0.5, rho=1.0, refractory="after_pool")
    x = torch.zeros(1, 1, 2, 2)
    state = DecolleState(x, x.clone(), torch.zeros(1, 1, 1, 1))
    for expected_u, expected_r in ((1.0, 0.5), (0.5, 0.75), (0.25, 0.875)):
        out, state = decolle_step(x, state, params, lambda p: v, torch.nn.MaxPool2d(2))
        assert out.u.item() == expected_u and state.r.item() == expected_r


def test_spike_at_zero_decides_whether_u_equal_to_zero_spikes():
    u = torch.tensor([-1e-30, 0.0, 1e-30])
    assert spike(u, "fast_sigmoid", spike_at_zero=True).tolist() == [0.0, 1.0, 1.0]
    assert spike(u, "fast_sigmoid", spike_at_zero=False).tolist() == [0.0, 0.0, 1.0]
