"""Neuron models as pure step functions: ``step(x, state, params) -> (out, state)``.

The DECOLLE neuron (Kaiser, Mostafa & Neftci 2020, Eq. 4) keeps its leaky traces on the
*input* side of the synapse: Q and P filter the presynaptic spikes, so the weight update
``dW = error * sigma'(U) * P`` is a product of quantities local to the synapse.
"""

from __future__ import annotations

import math
from typing import Callable, Literal, NamedTuple

import torch
from torch import Tensor

Surrogate = Literal["boxcar", "fast_sigmoid", "sigmoid"]
Ordering = Literal["current", "lagged"]
SURROGATES: tuple[str, ...] = ("boxcar", "fast_sigmoid", "sigmoid")
ORDERINGS: tuple[str, ...] = ("current", "lagged")


# --- surrogate gradients -------------------------------------------------------------
# Forward is always the Heaviside step Theta(u) = [u >= 0]; only the backward differs.


class _BoxcarSpike(torch.autograd.Function):
    """sigma'(u) = 1 on [-0.5, 0.5]: the derivative of a piecewise-linear activation (paper)."""

    @staticmethod
    def forward(ctx, u: Tensor) -> Tensor:
        ctx.save_for_backward(u)
        return (u >= 0).to(u.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (u,) = ctx.saved_tensors
        return grad * (u.abs() <= 0.5).to(grad.dtype)


class _FastSigmoidSpike(torch.autograd.Function):
    """sigma'(u) = 1 / (10|u| + 1)^2 (SuperSpike; the authors' current default)."""

    @staticmethod
    def forward(ctx, u: Tensor) -> Tensor:
        ctx.save_for_backward(u)
        return (u >= 0).to(u.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (u,) = ctx.saved_tensors
        return grad / (10.0 * u.abs() + 1.0) ** 2


class _SigmoidSpike(torch.autograd.Function):
    """sigma'(u) = s(u)(1 - s(u)) with the logistic s, slope 1."""

    @staticmethod
    def forward(ctx, u: Tensor) -> Tensor:
        ctx.save_for_backward(u)
        return (u >= 0).to(u.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (u,) = ctx.saved_tensors
        s = torch.sigmoid(u)
        return grad * s * (1.0 - s)


_SPIKE_FNS: dict[str, Callable[[Tensor], Tensor]] = {
    "boxcar": _BoxcarSpike.apply,
    "fast_sigmoid": _FastSigmoidSpike.apply,
    "sigmoid": _SigmoidSpike.apply,
}


def spike(u: Tensor, surrogate: Surrogate = "boxcar") -> Tensor:
    """Theta(u): 1.0 where ``u >= 0``, with the chosen surrogate derivative for autograd."""
    try:
        fn = _SPIKE_FNS[surrogate]
    except KeyError:
        raise ValueError(f"unknown surrogate {surrogate!r}; valid: {', '.join(SURROGATES)}") from None
    return fn(u)


def surrogate_derivative(u: Tensor, surrogate: Surrogate = "boxcar") -> Tensor:
    """sigma'(u) in closed form (the post-synaptic factor of the three-factor rule)."""
    if surrogate == "boxcar":
        return (u.abs() <= 0.5).to(u.dtype)
    if surrogate == "fast_sigmoid":
        return 1.0 / (10.0 * u.abs() + 1.0) ** 2
    if surrogate == "sigmoid":
        s = torch.sigmoid(u)
        return s * (1.0 - s)
    raise ValueError(f"unknown surrogate {surrogate!r}; valid: {', '.join(SURROGATES)}")


# --- the DECOLLE neuron ----------------------------------------------------------------


class DecolleParams(NamedTuple):
    """Decays per time step. Defaults are those of the authors' code (dt = 1 ms).

    ``ordering="current"``: P[t+1] is driven by Q[t+1], so input spikes at step t reach U at
    step t; this maps exactly onto NIR's CubaLIF. ``"lagged"``: P is driven by the previous
    Q, as in the authors' released code (one extra step of delay).
    """

    alpha: float = 0.97  # membrane trace P, exp(-dt/tau_mem)
    beta: float = 0.92  # synaptic trace Q, exp(-dt/tau_syn)
    gamma: float = 0.65  # refractory trace R, exp(-dt/tau_ref)
    rho: float = 1.0  # refractory strength
    ordering: Ordering = "current"

    @classmethod
    def from_taus(
        cls,
        tau_mem: float,
        tau_syn: float,
        tau_ref: float,
        dt: float = 1e-3,
        rho: float = 1.0,
        ordering: Ordering = "current",
    ) -> "DecolleParams":
        """Decays from time constants (same unit as ``dt``)."""
        for name, tau in (("tau_mem", tau_mem), ("tau_syn", tau_syn), ("tau_ref", tau_ref)):
            if not tau > 0:
                raise ValueError(f"{name} must be > 0, got {tau}")
        return cls(
            alpha=math.exp(-dt / tau_mem),
            beta=math.exp(-dt / tau_syn),
            gamma=math.exp(-dt / tau_ref),
            rho=rho,
            ordering=ordering,
        )


class DecolleState(NamedTuple):
    """P and Q have the shape of the layer's *input*; R the shape of its output."""

    p: Tensor
    q: Tensor
    r: Tensor


class DecolleOutput(NamedTuple):
    s: Tensor  # spikes Theta(U)
    u: Tensor  # membrane potential (after pooling), graph attached for the local loss


def input_trace_step(
    x: Tensor, p: Tensor, q: Tensor, params: DecolleParams
) -> tuple[Tensor, Tensor]:
    """Advance the presynaptic traces (P, Q) by one step of input spikes ``x``."""
    q_next = torch.lerp(x, q, params.beta)  # beta q + (1 - beta) x, in one pass
    drive = q_next if params.ordering == "current" else q
    p_next = torch.lerp(drive, p, params.alpha)
    return p_next, q_next


def decolle_step(
    x: Tensor,
    state: DecolleState,
    params: DecolleParams,
    synapse: Callable[[Tensor], Tensor],
    pool: Callable[[Tensor], Tensor] | None = None,
    surrogate: Surrogate = "boxcar",
) -> tuple[DecolleOutput, DecolleState]:
    """One time step of a DECOLLE layer.

    U = pool(W P + b) - rho R, S = Theta(U), R <- gamma R + (1 - gamma) S.
    Max-pooling acts on the membrane before the spike, as in the authors' code, so the
    surrogate gradient reaches only the winning position of each pool.
    """
    p, q = input_trace_step(x, state.p, state.q, params)
    u = synapse(p)
    if pool is not None:
        u = pool(u)
    u = torch.sub(u, state.r, alpha=params.rho)
    s = spike(u, surrogate)
    r = torch.lerp(s, state.r, params.gamma)  # gamma R + (1 - gamma) S
    return DecolleOutput(s, u), DecolleState(p, q, r)


def initial_decolle_state(
    x: Tensor, output_shape: tuple[int, ...]
) -> DecolleState:
    """All-zero state for input like ``x`` and outputs of ``output_shape`` (batch included).

    R takes the memory layout of ``x`` (channels-last or not): U comes out of the synapse in
    that layout, and an R in another one would make every ``U - rho R`` and R update a slow
    mixed-stride loop (same values either way)."""
    zeros = torch.zeros_like(x)
    r = x.new_zeros(output_shape)
    if (r.dim() == 4 and x.dim() == 4 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last)):
        r = r.contiguous(memory_format=torch.channels_last)
    return DecolleState(zeros, zeros.clone(), r)


def detach_state(state: DecolleState) -> DecolleState:
    """Cut the graph at a step boundary: DECOLLE never backpropagates through time."""
    return DecolleState(*(t.detach() for t in state))


# --- the soft-reset LIF neuron of S-TLLR ---------------------------------------------------
# u[t] = gamma (u[t-1] - v_th y[t-1]) + I[t],  y[t] = Theta(u[t] - v_th)   (Apolinario & Roy)
# where I[t] = W x[t] (+ b) (+ V y[t-1] for a recurrent layer) is computed by the layer.


class LIFParams(NamedTuple):
    """Leak per step ``gamma`` and firing threshold ``v_th`` of the soft-reset LIF neuron."""

    gamma: float = 0.9
    v_th: float = 1.0


class LIFState(NamedTuple):
    """Membrane and spikes of the previous step (the spikes drive the soft reset)."""

    u: Tensor
    s: Tensor


class LIFOutput(NamedTuple):
    s: Tensor  # spikes Theta(u - v_th), with the surrogate derivative for autograd
    u: Tensor  # membrane potential


def lif_step(
    current: Tensor, state: LIFState, params: LIFParams, surrogate: Surrogate = "boxcar"
) -> tuple[LIFOutput, LIFState]:
    """One step of soft-reset LIF neurons driven by the synaptic ``current`` I[t].

    u = gamma (u_prev - v_th s_prev) + I, s = Theta(u - v_th).
    """
    u = params.gamma * (state.u - params.v_th * state.s) + current
    s = spike(u - params.v_th, surrogate)
    return LIFOutput(s, u), LIFState(u, s)


def initial_lif_state(like: Tensor, shape: tuple[int, ...] | None = None) -> LIFState:
    """All-zero LIF state of ``shape`` (batch included; default: the shape of ``like``)."""
    zeros = like.new_zeros(like.shape if shape is None else shape)
    return LIFState(zeros, zeros.clone())


def detach_lif_state(state: LIFState) -> LIFState:
    """Cut the graph at a step boundary."""
    return LIFState(state.u.detach(), state.s.detach())
