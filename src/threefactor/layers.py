"""Thin modules around the step functions: ``forward(x, state=None) -> (out, state)``."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .neurons import (
    DecolleOutput,
    DecolleParams,
    DecolleState,
    Surrogate,
    decolle_step,
    initial_decolle_state,
)


class DecolleLayer(nn.Module):
    """A synapse (``nn.Linear`` or ``nn.Conv2d``), optional max-pooling, and DECOLLE neurons."""

    def __init__(
        self,
        synapse: nn.Linear | nn.Conv2d,
        params: DecolleParams = DecolleParams(),
        pool: int = 1,
        surrogate: Surrogate = "boxcar",
    ) -> None:
        super().__init__()
        self.synapse = synapse
        self.params = params
        self.pool = nn.MaxPool2d(pool) if pool > 1 else None
        self.surrogate = surrogate

    def _flat(self, x: Tensor) -> Tensor:
        # A dense layer after a conv layer sees the flattened feature map.
        return x.flatten(1) if isinstance(self.synapse, nn.Linear) and x.dim() > 2 else x

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of S for one sample (no batch) given one sample's input shape."""
        with torch.no_grad():
            w = self.synapse.weight
            x = self._flat(torch.zeros((1, *input_shape), device=w.device, dtype=w.dtype))
            u = self.synapse(x)
            if self.pool is not None:
                u = self.pool(u)
        return tuple(u.shape[1:])

    def forward(
        self, x: Tensor, state: DecolleState | None = None
    ) -> tuple[DecolleOutput, DecolleState]:
        x = self._flat(x)
        if state is None:
            out_shape = (x.shape[0], *self.output_shape(tuple(x.shape[1:])))
            state = initial_decolle_state(x, out_shape)
        return decolle_step(x, state, self.params, self.synapse, self.pool, self.surrogate)


class _FeedbackAlignedLinear(torch.autograd.Function):
    """y = s G^T forward; the error goes back through H instead of G (Sec. 2.3.2)."""

    @staticmethod
    def forward(ctx, s: Tensor, g: Tensor, h: Tensor) -> Tensor:
        ctx.save_for_backward(h)
        return s @ g.t()

    @staticmethod
    def backward(ctx, grad: Tensor):
        (h,) = ctx.saved_tensors
        return grad @ h, None, None


class LocalReadout(nn.Module):
    """The fixed random readout Y = G S of one layer (never trained, never in the optimiser).

    G ~ U(-a/sqrt(fan_in), a/sqrt(fan_in)). With ``feedback_alignment`` the backward pass
    uses H = G * omega, omega ~ N(1, 1/2) elementwise with negative omega set to 0, so the
    feedback keeps the sign of G (or is zero) but not its magnitude.
    """

    g: Tensor
    h: Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        scale: float = 0.5,
        feedback_alignment: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        bound = scale / math.sqrt(in_features)
        g = (torch.rand(out_features, in_features, generator=generator) * 2 - 1) * bound
        self.register_buffer("g", g)
        self.feedback_alignment = feedback_alignment
        if feedback_alignment:
            omega = 1.0 + math.sqrt(0.5) * torch.randn(g.shape, generator=generator)
            self.register_buffer("h", g * omega.clamp_min(0.0))
        else:
            self.register_buffer("h", g)

    def forward(self, s: Tensor) -> Tensor:
        s = s.flatten(1)
        if self.feedback_alignment:
            return _FeedbackAlignedLinear.apply(s, self.g, self.h)
        return s @ self.g.t()

    def extra_repr(self) -> str:
        return f"in={self.g.shape[1]}, out={self.g.shape[0]}, feedback_alignment={self.feedback_alignment}"
