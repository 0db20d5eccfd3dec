"""Thin modules around the step functions: ``forward(x, state=None) -> (out, state)``.

``SpikingLayer`` is that contract; ``DecolleLayer`` and ``LIFLayer`` keep it, and so may any
user's layer (``DecolleNetwork.from_layers``).
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from .neurons import (
    DecolleOutput,
    DecolleParams,
    DecolleState,
    LIFParams,
    LIFState,
    decolle_step,
    initial_decolle_state,
    lif_psi,
    lif_step,
)
from .surrogates import LIF_SURROGATES, LIFSurrogate, Surrogate


class StepOutput(Protocol):
    """What one step of a layer gives: its spikes and its membrane potentials (a NamedTuple)."""

    @property
    def s(self) -> Tensor: ...  # spikes, (B, ...): the next layer's input and the readout's

    @property
    def u(self) -> Tensor: ...  # membrane potentials, (B, ...), graph attached for the local loss


class SpikingLayer(Protocol):
    """The step contract of a layer of a ``DecolleNetwork``: an ``nn.Module`` whose
    ``forward(x, state)`` takes a batch of input ``x`` (B, ...) and its state of the previous
    step (``None`` at the first step) and returns ``(out, state)``: ``out`` has the spikes
    ``.s`` and membranes ``.u``, ``state`` is a NamedTuple of tensors (the network detaches
    each of them between steps for the local rules)."""

    def __call__(self, x: Tensor, state: Any = None) -> tuple[StepOutput, tuple[Tensor, ...]]: ...


# A conv DecolleLayer with at least this many input channels keeps its input, traces and
# membrane in plain NCHW on CPU; narrower ones use channels-last (see DecolleLayer.format_input).
WIDE_CONV_CHANNELS = 32


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

    def format_input(self, x: Tensor) -> Tensor:
        """The layer's input as its synapse takes it: flattened for a dense layer, in the memory
        layout chosen for a conv layer (the traces made from it keep that layout)."""
        if isinstance(self.synapse, nn.Linear):
            # A dense layer after a conv layer sees the flattened feature map.
            return x.flatten(1) if x.dim() > 2 else x
        # Memory layout per layer, measured on CPU (docs/benchmarks.md): channels-last suits
        # narrow inputs (its max-pooling is ~2x faster there); plain NCHW suits wide ones
        # (in_channels >= WIDE_CONV_CHANNELS), where oneDNN's blocked kernels are 10-40 % faster
        # and the weight is not copied into channels-last at every call. The traces created
        # from x keep the layout, so this copies only when the input is not in it.
        if x.device.type == "cpu" and self.synapse.in_channels >= WIDE_CONV_CHANNELS:
            return x.contiguous()
        return x.contiguous(memory_format=torch.channels_last)

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of S for one sample (no batch) given one sample's input shape."""
        return self._shapes(input_shape)[1]

    def refractory_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the refractory trace R for one sample: the unpooled map when R is kept
        before the pool (``params.refractory``), else the output's."""
        synapse_shape, out_shape = self._shapes(input_shape)
        return synapse_shape if self.params.refractory == "before_pool" else out_shape

    def _shapes(self, input_shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        with torch.no_grad():
            w = self.synapse.weight
            x = self.format_input(torch.zeros((1, *input_shape), device=w.device, dtype=w.dtype))
            u = self.synapse(x)
            pooled = u if self.pool is None else self.pool(u)
        return tuple(u.shape[1:]), tuple(pooled.shape[1:])

    def initial_state(self, x: Tensor) -> DecolleState:
        """All-zero state for a batch of input ``x`` as the synapse takes it (``format_input``)."""
        return initial_decolle_state(x, (x.shape[0], *self.refractory_shape(tuple(x.shape[1:]))))

    def forward(
        self, x: Tensor, state: DecolleState | None = None
    ) -> tuple[DecolleOutput, DecolleState]:
        x = self.format_input(x)
        if state is None:
            state = self.initial_state(x)
        return decolle_step(x, state, self.params, self.synapse, self.pool, self.surrogate)

    def supports_closed_form(self) -> bool:
        """Whether this layer's step is one the DECOLLE rule's closed-form gradient computes:
        this class's own ``forward`` (a subclass that overrides it is not), a synapse that runs
        ``nn.Linear``'s or ``nn.Conv2d``'s own forward (the conv zero-padded by an explicit
        amount), and no pooling or a non-overlapping max-pool without padding or dilation."""
        if type(self).forward is not DecolleLayer.forward:
            return False
        syn = self.synapse
        if isinstance(syn, nn.Conv2d):
            if (type(syn).forward is not nn.Conv2d.forward or syn.padding_mode != "zeros"
                    or isinstance(syn.padding, str)):
                return False
        elif not (isinstance(syn, nn.Linear) and type(syn).forward is nn.Linear.forward):
            return False
        pool = self.pool
        return pool is None or (
            isinstance(pool, nn.MaxPool2d) and type(pool).forward is nn.MaxPool2d.forward
            and isinstance(pool.kernel_size, int) and pool.stride == pool.kernel_size
            and pool.padding == 0 and pool.dilation == 1 and not pool.ceil_mode and not pool.return_indices)


def keep_mask(rand: Tensor, p: float) -> Tensor:
    """Dropout's scaled keep-mask from uniform draws: (rand >= p) / (1 - p)."""
    return (rand >= p).to(rand.dtype).mul_(1.0 / (1.0 - p))


class ReadoutDropout(nn.Module):
    """Dropout of the spikes a readout sees (training only): S * mask / (1 - p).

    The keep-mask is ``rand >= p``: the same distribution as ``nn.Dropout``, drawn about 4x
    faster on CPU than its Bernoulli sampling, which at the paper's sizes took ~10 % of a
    training step. ``mask`` exposes it, for rules that apply the readout's backward themselves.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = p

    def mask(self, s: Tensor) -> Tensor | None:
        """The scaled keep-mask for ``s``, or None when nothing is dropped."""
        rand = self.draw(s)
        return None if rand is None else keep_mask(rand, self.p)

    def draw(self, s: Tensor) -> Tensor | None:
        """The uniform draws behind ``mask(s)`` (None when nothing is dropped), for callers that
        build the mask elsewhere (``keep_mask``) from the same random stream."""
        if not self.training or self.p == 0.0:
            return None
        return torch.rand_like(s)

    def forward(self, s: Tensor) -> Tensor:
        m = self.mask(s)
        return s if m is None else s * m

    def extra_repr(self) -> str:
        return f"p={self.p}"


def is_channels_last(s: Tensor) -> bool:
    """Whether a 4-d ``s`` is laid out channels-last (and not also plain contiguous)."""
    return s.dim() == 4 and s.is_contiguous(memory_format=torch.channels_last) and not s.is_contiguous()


def flat_in_memory_order(s: Tensor) -> Tensor:
    """``s`` as (B, N) without copying: (C, H, W) order, or (H, W, C) for a channels-last map."""
    return s.permute(0, 2, 3, 1).flatten(1) if is_channels_last(s) else s.flatten(1)


def unflatten_like(flat: Tensor, s: Tensor) -> Tensor:
    """The inverse of ``flat_in_memory_order(s)``: ``flat`` (B, N) shaped and laid out like ``s``."""
    if is_channels_last(s):
        b, c, hh, ww = s.shape
        return flat.view(b, hh, ww, c).permute(0, 3, 1, 2)
    return flat.view(s.shape)


class _FeedbackAlignedLinear(torch.autograd.Function):
    """y = s G^T forward; the error goes back through H instead of G (Sec. 2.3.2)."""

    @staticmethod
    def forward(ctx, s: Tensor, g: Tensor, h: Tensor) -> Tensor:
        ctx.save_for_backward(h)
        return s @ g.t()

    @staticmethod
    def backward(ctx, grad: Tensor):
        (h,) = ctx.saved_tensors
        return grad.to(h.dtype) @ h, None, None  # grad is bf16 when the forward ran under autocast


class LocalReadout(nn.Module):
    """The fixed random readout Y = G S of one layer (never trained, never in the optimiser).

    G ~ U(-a/sqrt(fan_in), a/sqrt(fan_in)). With ``feedback_alignment`` the backward pass
    uses H = G * omega, omega ~ N(1, 1/2) elementwise with negative omega set to 0, so the
    feedback keeps the sign of G (or is zero) but not its magnitude.
    """

    g: Tensor
    h: Tensor
    bias: Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        scale: float = 0.5,
        feedback_alignment: bool = False,
        generator: torch.Generator | None = None,
        bias: bool = False,
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
        # The authors' readouts are nn.Linear layers whose bias is drawn like G and then frozen.
        # It shifts Y but not dL/dS, so it changes the loss's operating point, not the rule.
        b = (torch.rand(out_features, generator=generator) * 2 - 1) * bound if bias else None
        self.register_buffer("bias", b)
        self._hwc_cache: tuple | None = None

    @classmethod
    def from_weights(cls, g: Tensor, bias: Tensor | None = None) -> "LocalReadout":
        """The readout with the given G (classes, fan_in) and bias, on their device and dtype
        (no feedback alignment: H = G)."""
        g = g.detach()
        readout = cls(g.shape[1], g.shape[0], bias=bias is not None).to(g.device, g.dtype)
        with torch.no_grad():
            readout.g.copy_(g)
            readout.h.copy_(g)
            if bias is not None:
                readout.bias.copy_(bias.detach())
        return readout

    def matched(self, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``s`` flattened (B, N) without copying, and G and H with their columns in the same order.

        A channels-last map is read in its memory order (H, W, C): flattening it in (C, H, W)
        order would copy it, and its gradient would come back in the wrong layout and be copied
        again before max-pooling's backward. G and H reordered to match are cached (they are
        fixed; the cache follows their device and any in-place change such as loading a state).
        """
        if is_channels_last(s):
            c, hh, ww = s.shape[1:]
            key = (c, hh, ww, self.g.device, self.g.dtype, self.g._version, self.h._version,
                   self.g.data_ptr(), self.h.data_ptr())
            if self._hwc_cache is None or self._hwc_cache[0] != key:
                g, h = (m.view(-1, c, hh, ww).permute(0, 2, 3, 1).flatten(1) for m in (self.g, self.h))
                self._hwc_cache = (key, g, h)
            return flat_in_memory_order(s), self._hwc_cache[1], self._hwc_cache[2]
        return s.flatten(1), self.g, self.h

    def forward(self, s: Tensor) -> Tensor:
        s, g, h = self.matched(s)
        y = _FeedbackAlignedLinear.apply(s, g, h) if self.feedback_alignment else s @ g.t()
        return y if self.bias is None else y + self.bias

    def input_grad(self, grad_y: Tensor, s: Tensor) -> Tensor:
        """dL/dS for dL/dY ``grad_y`` (B, C): ``grad_y H``, shaped and laid out like ``s``."""
        return unflatten_like(grad_y @ self.matched(s)[2], s)

    def extra_repr(self) -> str:
        return (f"in={self.g.shape[1]}, out={self.g.shape[0]}, feedback_alignment={self.feedback_alignment}, "
                f"bias={self.bias is not None}")


# --- soft-reset LIF layers (S-TLLR, and BPTT on the same network) ------------------------


class LIFLayerOutput(NamedTuple):
    s: Tensor  # the layer's output: spikes after pooling (what the next layer and the readout see)
    u: Tensor  # membrane potential of the neurons
    s_neurons: Tensor  # spikes of the neurons themselves, before pooling


class LIFLayer(nn.Module):
    """A synapse (``nn.Linear`` or ``nn.Conv2d``), LIF neurons (soft or hard reset), optional
    max-pooling of their spikes, and for dense layers an optional recurrent synapse (no bias).

    I[t] = W x[t] + b (+ V s[t-1]);  u, s = lif_step(I, state);  out = maxpool(s).
    Unlike ``DecolleLayer`` the pooling acts on the *spikes*, after the neuron, so every neuron
    has one fixed receptive field and the S-TLLR eligibility of its synapses is well defined.

    ``surrogate`` names the spike's derivative Psi (``lif_psi``); ``authors`` is the S-TLLR
    authors' choice for the layer's kind: ``authors_linear`` for dense, ``authors_conv`` for conv.
    """

    def __init__(
        self,
        synapse: nn.Linear | nn.Conv2d,
        params: LIFParams = LIFParams(),
        pool: int = 1,
        surrogate: LIFSurrogate | Literal["authors"] = "boxcar",
        recurrent: nn.Linear | None = None,
    ) -> None:
        super().__init__()
        if recurrent is not None and not isinstance(synapse, nn.Linear):
            raise ValueError("only dense LIF layers can be recurrent")
        self.synapse = synapse
        self.recurrent = recurrent
        self.params = params
        self.pool = nn.MaxPool2d(pool) if pool > 1 else None
        self.surrogate = self.psi_name(surrogate)

    def psi_name(self, surrogate: str | None = None) -> LIFSurrogate:
        """The Psi this layer uses for ``surrogate`` (default: its own), ``authors`` resolved
        to the authors' function for the layer's kind."""
        name = self.surrogate if surrogate is None else surrogate
        if name == "authors":
            return "authors_linear" if isinstance(self.synapse, nn.Linear) else "authors_conv"
        if name not in LIF_SURROGATES:
            raise ValueError(f"unknown surrogate {name!r}; valid: authors, {', '.join(LIF_SURROGATES)}")
        return name

    def psi(self, u: Tensor, surrogate: str | None = None) -> Tensor:
        """Psi(u) of the layer's neurons at membrane ``u`` (``surrogate``: as in ``psi_name``)."""
        return lif_psi(u, self.params.v_th, self.psi_name(surrogate))

    def format_input(self, x: Tensor) -> Tensor:
        """The layer's input as its synapse takes it (flattened for dense, channels-last for conv)."""
        if isinstance(self.synapse, nn.Linear):
            return x.flatten(1) if x.dim() > 2 else x
        return x.contiguous(memory_format=torch.channels_last)

    def neuron_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of u for one sample given one sample's input shape."""
        with torch.no_grad():
            w = self.synapse.weight
            x = self.format_input(torch.zeros((1, *input_shape), device=w.device, dtype=w.dtype))
            return tuple(self.synapse(x).shape[1:])

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the layer's output (after pooling) for one sample."""
        shape = self.neuron_shape(input_shape)
        if self.pool is None:
            return shape
        with torch.no_grad():
            return tuple(self.pool(torch.zeros((1, *shape))).shape[1:])

    def initial_state(self, x: Tensor) -> LIFState:
        """All-zero state for a batch of formatted input ``x``."""
        shape = (x.shape[0], *self.neuron_shape(tuple(x.shape[1:])))
        zeros = x.new_zeros(shape)
        if zeros.dim() == 4:
            zeros = zeros.contiguous(memory_format=torch.channels_last)
        return LIFState(zeros, zeros.clone())

    def forward(
        self, x: Tensor, state: LIFState | None = None, surrogate: str | None = None
    ) -> tuple[LIFLayerOutput, LIFState]:
        """One step; ``surrogate`` replaces the layer's own Psi for this call (S-TLLR sends its
        learning signal across the layer through the rule's Psi)."""
        x = self.format_input(x)
        if state is None:
            state = self.initial_state(x)
        current = self.synapse(x)
        if self.recurrent is not None:
            current = current + self.recurrent(state.s)
        out, state = lif_step(current, state, self.params, self.psi_name(surrogate))
        s = self.pool(out.s) if self.pool is not None else out.s
        return LIFLayerOutput(s, out.u, out.s), state
