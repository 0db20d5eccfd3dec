"""The spike and its surrogate gradients: the Heaviside step forward, sigma'(u) backward.

Every neuron model spikes through ``spike``; only its backward (the surrogate) differs. The
derivatives are plain functions in one table, so a rule that forms the update without
autograd (DECOLLE's closed form, S-TLLR's Psi) evaluates exactly what autograd would.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor

Surrogate = Literal["boxcar", "fast_sigmoid", "sigmoid"]
# LIF networks (S-TLLR) also take the S-TLLR authors' two: their dense and recurrent layers use
# authors_linear, their conv layers authors_conv.
LIFSurrogate = Literal["boxcar", "fast_sigmoid", "sigmoid", "authors_linear", "authors_conv"]


def _boxcar(u: Tensor) -> Tensor:
    """1 on [-0.5, 0.5]: the derivative of a piecewise-linear activation (the paper)."""
    return (u.abs() <= 0.5).to(u.dtype)


def _fast_sigmoid(u: Tensor) -> Tensor:
    """1 / (10|u| + 1)^2 (SuperSpike; the authors' current default)."""
    return 1.0 / (10.0 * u.abs() + 1.0) ** 2


def _sigmoid(u: Tensor) -> Tensor:
    """s(u)(1 - s(u)) with the logistic s, slope 1."""
    s = torch.sigmoid(u)
    return s * (1.0 - s)


def _authors_linear(u: Tensor) -> Tensor:
    """1 / (100|u| + 1)^2: the Psi of the S-TLLR authors' dense and recurrent layers (a fast
    sigmoid ten times narrower)."""
    return 1.0 / (100.0 * u.abs() + 1.0) ** 2


def _authors_conv(u: Tensor) -> Tensor:
    """0.3 max(0, 1 - |u|): the Psi of the S-TLLR authors' convolutional layers."""
    return 0.3 * (1.0 - u.abs()).clamp(min=0.0)


SURROGATE_DERIVATIVES: dict[str, Callable[[Tensor], Tensor]] = {
    "boxcar": _boxcar,
    "fast_sigmoid": _fast_sigmoid,
    "sigmoid": _sigmoid,
    "authors_linear": _authors_linear,
    "authors_conv": _authors_conv,
}
# The surrogates of DECOLLE networks; LIF networks take every row of the table.
SURROGATES: tuple[str, ...] = ("boxcar", "fast_sigmoid", "sigmoid")
LIF_SURROGATES: tuple[str, ...] = (*SURROGATES, "authors_linear", "authors_conv")


def surrogate_derivative(u: Tensor, surrogate: LIFSurrogate = "boxcar") -> Tensor:
    """sigma'(u) in closed form (the post-synaptic factor of the three-factor rule)."""
    try:
        return SURROGATE_DERIVATIVES[surrogate](u)
    except KeyError:
        raise ValueError(f"unknown surrogate {surrogate!r}; valid: {', '.join(SURROGATE_DERIVATIVES)}") from None


def fires(u: Tensor, spike_at_zero: bool = True) -> Tensor:
    """Theta(u) without a gradient: 1.0 where ``u >= 0`` (or ``u > 0`` when not ``spike_at_zero``)."""
    return (u >= 0 if spike_at_zero else u > 0).to(u.dtype)


class _Spike(torch.autograd.Function):
    """Theta(u) forward, the surrogate's sigma'(u) backward."""

    @staticmethod
    def forward(ctx, u: Tensor, surrogate: str, spike_at_zero: bool) -> Tensor:
        ctx.save_for_backward(u)
        ctx.surrogate = surrogate
        return fires(u, spike_at_zero)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (u,) = ctx.saved_tensors
        return grad * SURROGATE_DERIVATIVES[ctx.surrogate](u), None, None


def spike(u: Tensor, surrogate: LIFSurrogate = "boxcar", spike_at_zero: bool = True) -> Tensor:
    """Theta(u) with the chosen surrogate derivative for autograd: 1.0 where ``u >= 0``, or
    where ``u > 0`` when not ``spike_at_zero`` (the authors' fast-sigmoid neurons)."""
    if surrogate not in SURROGATE_DERIVATIVES:
        raise ValueError(f"unknown surrogate {surrogate!r}; valid: {', '.join(SURROGATE_DERIVATIVES)}")
    return _Spike.apply(u, surrogate, spike_at_zero)
