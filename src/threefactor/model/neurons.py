"""Neuron models as pure step functions: ``step(x, state, params) -> (out, state)``.

They spike through ``surrogates.spike`` (Heaviside forward, surrogate derivative backward).

The DECOLLE neuron (Kaiser, Mostafa & Neftci 2020, Eq. 4) keeps its leaky traces on the
*input* side of the synapse: Q and P filter the presynaptic spikes, so the weight update
``dW = error * sigma'(U) * P`` is a product of quantities local to the synapse.
"""

from __future__ import annotations

import math
from typing import Callable, Literal, NamedTuple

import torch
from torch import Tensor

from .surrogates import LIF_SURROGATES, LIFSurrogate, Surrogate, fires, spike, surrogate_derivative

Ordering = Literal["current", "lagged"]
Refractory = Literal["after_pool", "before_pool"]
ORDERINGS: tuple[str, ...] = ("current", "lagged")
REFRACTORY_PLACEMENTS: tuple[str, ...] = ("after_pool", "before_pool")


# --- the DECOLLE neuron ----------------------------------------------------------------


class DecolleParams(NamedTuple):
    """Decays per time step and the variant of the dynamics. Decays default to those of the
    authors' code (dt = 1 ms).

    ``ordering="current"``: P[t+1] is driven by Q[t+1], so input spikes at step t reach U at
    step t; this maps exactly onto NIR's CubaLIF. ``"lagged"``: P is driven by the previous
    Q, as in the authors' released code (one extra step of delay).

    ``refractory`` matters only for max-pooled layers. ``"before_pool"`` (the authors' code):
    every neuron of the unpooled map has its own R, driven by its own spikes, and the layer
    spikes on maxpool(W P + b - rho R). ``"after_pool"``: one R per pooled unit, driven by the
    pooled spikes and subtracted after the pool. ``spike_at_zero``: whether U = 0 exactly is a
    spike (the authors' fast-sigmoid neurons spike on U > 0 only).
    """

    alpha: float = 0.97  # membrane trace P, exp(-dt/tau_mem)
    beta: float = 0.92  # synaptic trace Q, exp(-dt/tau_syn)
    gamma: float = 0.65  # refractory trace R, exp(-dt/tau_ref)
    rho: float = 1.0  # refractory strength
    ordering: Ordering = "current"
    refractory: Refractory = "before_pool"
    spike_at_zero: bool = False

    @classmethod
    def from_taus(
        cls,
        tau_mem: float,
        tau_syn: float,
        tau_ref: float,
        dt: float = 1e-3,
        **variant,
    ) -> "DecolleParams":
        """Decays from time constants (same unit as ``dt``); ``variant`` sets the other fields."""
        for name, tau in (("tau_mem", tau_mem), ("tau_syn", tau_syn), ("tau_ref", tau_ref)):
            if not tau > 0:
                raise ValueError(f"{name} must be > 0, got {tau}")
        return cls(
            alpha=math.exp(-dt / tau_mem),
            beta=math.exp(-dt / tau_syn),
            gamma=math.exp(-dt / tau_ref),
            **variant,
        )


class DecolleState(NamedTuple):
    """P and Q have the shape of the layer's *input*; R the shape of its neurons (the pooled
    output with ``refractory="after_pool"``, the unpooled map with ``"before_pool"``)."""

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

    Without pooling: U = W P + b - rho R, S = Theta(U), R <- gamma R + (1 - gamma) S.
    With max-pooling the membrane is pooled before the spike, so the surrogate gradient
    reaches only the winning position of each pool; R enters before or after the pool as
    ``params.refractory`` says (before: R follows each unpooled neuron's own spikes).
    """
    p, q = input_trace_step(x, state.p, state.q, params)
    u = synapse(p)
    if pool is not None and params.refractory == "before_pool":
        u_neurons = torch.sub(u, state.r, alpha=params.rho)
        u = pool(u_neurons)
        s = spike(u, surrogate, params.spike_at_zero)
        r = torch.lerp(fires(u_neurons, params.spike_at_zero), state.r, params.gamma)
        return DecolleOutput(s, u), DecolleState(p, q, r)
    if pool is not None:
        u = pool(u)
    u = torch.sub(u, state.r, alpha=params.rho)
    s = spike(u, surrogate, params.spike_at_zero)
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
# The hard reset, u[t] = gamma u[t-1] (1 - y[t-1]) + I[t], is the authors' other option.

Reset = Literal["soft", "hard"]
RESETS: tuple[str, ...] = ("soft", "hard")


def lif_psi(u: Tensor, v_th: float, surrogate: LIFSurrogate = "boxcar") -> Tensor:
    """Psi(u) of LIF neurons with threshold ``v_th``: the surrogate's derivative at ``u - v_th``
    (S-TLLR's secondary activation)."""
    if surrogate not in LIF_SURROGATES:
        raise ValueError(f"unknown surrogate {surrogate!r}; valid: {', '.join(LIF_SURROGATES)}")
    return surrogate_derivative(u - v_th, surrogate)


def lif_spike(u: Tensor, v_th: float, surrogate: LIFSurrogate = "boxcar") -> Tensor:
    """Theta(u - v_th): 1.0 where ``u > v_th`` (strictly, as the S-TLLR authors' layers spike),
    with ``lif_psi`` as its derivative for autograd."""
    if surrogate not in LIF_SURROGATES:
        raise ValueError(f"unknown surrogate {surrogate!r}; valid: {', '.join(LIF_SURROGATES)}")
    return spike(u - v_th, surrogate, spike_at_zero=False)


class LIFParams(NamedTuple):
    """Leak per step ``gamma``, firing threshold ``v_th`` and reset of the LIF neuron."""

    gamma: float = 0.9
    v_th: float = 1.0
    reset: Reset = "soft"  # soft: subtract v_th after a spike; hard: set u to 0


class LIFState(NamedTuple):
    """Membrane and spikes of the previous step (the spikes drive the reset)."""

    u: Tensor
    s: Tensor


class LIFOutput(NamedTuple):
    s: Tensor  # spikes Theta(u - v_th), with Psi as their derivative for autograd
    u: Tensor  # membrane potential (before the reset that the spikes trigger at the next step)


def lif_step(
    current: Tensor, state: LIFState, params: LIFParams, surrogate: LIFSurrogate = "boxcar"
) -> tuple[LIFOutput, LIFState]:
    """One step of LIF neurons driven by the synaptic ``current`` I[t].

    soft reset: u = gamma (u_prev - v_th s_prev) + I;  hard reset: u = gamma u_prev (1 - s_prev) + I;
    s = Theta(u - v_th).
    """
    if params.reset == "soft":
        u = params.gamma * (state.u - params.v_th * state.s) + current
    elif params.reset == "hard":
        u = params.gamma * (state.u * (1.0 - state.s)) + current
    else:
        raise ValueError(f"unknown reset {params.reset!r}; valid: {', '.join(RESETS)}")
    s = lif_spike(u, params.v_th, surrogate)
    return LIFOutput(s, u), LIFState(u, s)


def initial_lif_state(like: Tensor, shape: tuple[int, ...] | None = None) -> LIFState:
    """All-zero LIF state of ``shape`` (batch included; default: the shape of ``like``)."""
    zeros = like.new_zeros(like.shape if shape is None else shape)
    return LIFState(zeros, zeros.clone())


def detach_lif_state(state: LIFState) -> LIFState:
    """Cut the graph at a step boundary."""
    return LIFState(state.u.detach(), state.s.detach())
