"""The DECOLLE rule: every layer learns at every step from its own fixed random readout.

What makes it local: a layer's input is the previous layer's spikes *detached*, all state is
detached every step, and each layer's loss depends only on its own readout. Summing the layer
losses before one ``backward()`` therefore gives each layer exactly the gradient of its own
loss (Eq. 7: dW = -eta dL/dS sigma'(U) P), and one optimiser step follows every time step
after the burn-in.

``precision="bf16"`` computes the synapses' products in bfloat16 and keeps everything else in
fp32 (``model.precision``): the closed form casts P and the weight for the synapse's forward
and its weight gradient; the autograd path runs the network's step under ``torch.autocast``
and forms the losses from fp32 readouts.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..model.layers import DecolleLayer, flat_in_memory_order, is_channels_last, keep_mask, unflatten_like
from ..model.network import DecolleNetwork, NetworkState
from ..model.neurons import DecolleState, input_trace_step
from ..model.precision import Precision, autocast, compute_dtype, parameter_device, resolve_precision
from ..model.surrogates import fires, surrogate_derivative
from .common import (
    Loss, LocalCostError, SequenceResult, SequenceTally, check_local, layer_losses, local_loss, loss_grad,
    regulariser, regulariser_grad, resolve_loss,
)

class DecolleRule:
    """Runs sequences through a network and applies the DECOLLE updates online.

    Any ``DecolleNetwork`` trains through autograd, whatever its layers (``from_layers``).
    Where the network says its step is one the closed form computes
    (``DecolleNetwork.supports_closed_form``), plain DECOLLE takes the closed-form step instead
    (``uses_closed_form``): the same updates without autograd, and without calling the layers'
    ``forward``, so their module hooks do not run. Use ``closed_form=False`` if you rely on hooks;
    the firing rates are in every ``SequenceResult`` either way.
    """

    def __init__(
        self,
        network: DecolleNetwork,
        optimizer: torch.optim.Optimizer,
        loss: Loss = "smooth_l1",
        reg1: float = 0.0,
        reg2: float = 0.0,
        burn_in: int = 0,
        error_trigger: "ErrorTrigger | None" = None,
        closed_form: bool = True,
        compile: bool = False,
        target_per_step: bool = False,
        precision: Precision = "fp32",
    ) -> None:
        """``loss``: a built-in name or a user cost ``cost(readout, target, layer_index) -> scalar``
        (its update then follows by autograd, within each layer and step). ``target_per_step``:
        the targets given to ``train_sequence`` have a time axis, (B, T, ...), and step t's cost
        sees ``target[:, t]`` (e.g. a regression target that changes in time). ``precision``:
        ``fp32``, ``bf16`` or ``auto`` (resolved for the network's device; ``self.precision`` says
        which)."""
        self.network = network
        self.optimizer = optimizer
        self.loss = resolve_loss(loss)
        self.reg1, self.reg2 = reg1, reg2
        self.burn_in = burn_in
        self.error_trigger = error_trigger
        self.closed_form = closed_form
        self.compile = compile
        self.target_per_step = target_per_step
        self._compiled = None  # the compiled _closed_form_math; False once compiling failed
        self.precision = resolve_precision(precision, parameter_device(network))
        self.compute_dtype = compute_dtype(self.precision)

    def layer_losses(self, out, target: Tensor) -> Tensor:
        """The local loss of every layer at one step, stacked (L,), graph attached."""
        return layer_losses(out, target, self.loss, self.reg1, self.reg2)

    def train_sequence(self, x: Tensor, labels: Tensor, state: tuple | None = None) -> SequenceResult:
        """Learn from one batch of sequences ``x`` (B, T, ...) with targets ``labels``: class
        indices (B,), or whatever the loss takes ((B, T, ...) with ``target_per_step``).
        ``state``: continue from the network state a previous call ended in (its
        ``SequenceResult.state``: a stream), with no burn-in; None starts from rest."""
        net = self.network
        burn_in = self.burn_in if state is None else 0
        tally = SequenceTally(net, x, burn_in)
        trigger = self.error_trigger
        if trigger is not None:
            trigger.start_sequence(len(net.layers))
        closed = self.uses_closed_form()
        target = F.one_hot(labels, tally.votes.shape[2]).to(x.dtype) if closed else None
        for t in range(x.shape[1]):
            if t < burn_in:
                with torch.no_grad(), autocast(self.precision, x.device):
                    out, state = net(x[:, t], state)
                tally.count_spikes(out.spikes)
                continue
            if closed:
                readouts, losses, spikes, state = self._closed_form_step(x[:, t], state, labels, target)
                tally.count_spikes(spikes)
                tally.count_step(readouts, losses)
                continue
            with autocast(self.precision, x.device):
                out, state = net(x[:, t], state)
            if self.precision != "fp32":  # losses and votes from fp32 readouts
                out = out._replace(readouts=tuple(y.float() for y in out.readouts))
            tally.count_spikes(out.spikes)
            target_t = labels[:, t] if self.target_per_step else labels
            if callable(self.loss) and t == burn_in:
                check_local(out, target_t, self.loss, net)  # once per sequence: a user cost stays in its layer
            losses = self.layer_losses(out, target_t)
            self.optimizer.zero_grad(set_to_none=True)
            if trigger is not None:
                for i, s in enumerate(out.spikes):
                    s.register_hook(trigger.hook(i))
            try:
                losses.sum().backward()
            except RuntimeError as err:
                if callable(self.loss) and "backward through the graph a second time" in str(err):
                    raise LocalCostError("the local cost uses a tensor of an earlier time step; a local "
                                         "cost may use only this step's readout and the target") from None
                raise
            if trigger is not None:
                trigger.end_step(net)
            self.optimizer.step()
            tally.count_step(out.readouts, losses)
        return tally.result(trigger.stats() if trigger is not None else None, state)

    def uses_closed_form(self) -> bool:
        """Whether ``train_sequence`` takes the closed-form step: asked for (``closed_form``), plain
        DECOLLE (no error trigger, a built-in loss, one target per sequence) on a ``DecolleNetwork``
        whose step the closed form computes (``DecolleNetwork.supports_closed_form``: dense or
        zero-padded conv synapses, non-overlapping max-pooling, no overridden ``forward``).
        Anything else goes through autograd."""
        net = self.network
        return (self.closed_form and self.error_trigger is None and not callable(self.loss)
                and not self.target_per_step and isinstance(net, DecolleNetwork) and net.supports_closed_form())

    @torch.no_grad()
    def _closed_form_step(
        self, x: Tensor, state: NetworkState | None, labels: Tensor, target: Tensor
    ) -> tuple[tuple[Tensor, ...], Tensor, tuple[Tensor, ...], NetworkState]:
        """One learning step with the gradients in closed form (Eq. 7), without autograd: every
        layer's readout, loss and spikes, and the new state.

        ``_closed_form_math`` gives every layer's new state, readout, loss and dW, db (compiled
        with ``compile``, from the second step of a sequence on); here the optimiser takes one step.
        """
        net = self.network
        eager = [None] * len(net.layers)  # draws and matched readouts: the math makes them
        update = None  # the optimiser's step, where the compiled math applies it
        if state is not None and self.compile and self._compiled is not False:
            # Made outside the compiled code: the dropout draws from the eager random stream
            # (inductor's own would differ), G and H matched to the spikes' memory order (their
            # cache is Python state). S has the layout of R, so these are what the eager math uses.
            like_s = [_like_spikes(layer, st.r) for layer, st in zip(net.layers, state)]
            rands = [net.dropout.draw(s) for s in like_s]
            matched = [r.matched(s)[1:] for r, s in zip(net.readouts, like_s)]
            # x[:, t] has a batch stride that depends on T; a guard on it would recompile for
            # every sequence length
            x = x.clone(memory_format=torch.contiguous_format)
            fusable = getattr(self.optimizer, "fused_update", None)
            learned = self._learned_parameters()
            update = fusable(learned) if fusable is not None else None
            try:
                outs = self._compiled_math()(x, state, labels, target, rands, matched, update)
            except Exception as err:  # noqa: BLE001 - a compiler failure falls back to eager
                self._compiled = False
                first = str(err).splitlines()[0] if str(err) else ""
                warnings.warn(f"rule.compile: torch.compile failed ({type(err).__name__}: {first}); "
                              "training continues with the eager closed form",
                              RuntimeWarning, stacklevel=3)
                update = None
                outs = self._closed_form_math(x, state, labels, target, rands, matched)
        else:
            outs = self._closed_form_math(x, state, labels, target, eager, eager)
        new_state, readouts, losses, spikes, grads = outs
        if update is not None:
            self.optimizer.fused_step_done(learned, _present(grads))
        else:
            for layer, (gw, gb) in zip(net.layers, grads):
                syn = layer.synapse
                syn.weight.grad = gw
                if syn.bias is not None:
                    syn.bias.grad = gb
            self.optimizer.step()
        return tuple(readouts), torch.stack(losses), tuple(spikes), tuple(new_state)

    def _learned_parameters(self) -> list[Tensor]:
        """The synapses' weights and biases, in the order of ``_closed_form_math``'s gradients."""
        return [p for layer in self.network.layers for p in (layer.synapse.weight, layer.synapse.bias)
                if p is not None]

    def _compiled_math(self):
        if self._compiled is None:
            self._compiled = torch.compile(self._closed_form_math, options={"layout_optimization": False})
        return self._compiled

    def _closed_form_math(self, x, state, labels, target, rands, matched, update=None):
        """Every layer's forward and Eq. 7, with no side effects but ``update``: the same forward as
        ``DecolleNetwork.forward`` (same arithmetic, same dropout draws; ``rands`` are those
        draws when given), then per layer: dL/dY of its loss, dL/dS = dL/dY H (times the dropout
        mask), dL/dU = dL/dS sigma'(U) (+ the regularisers' dL/dU), routed back through the
        max-pool to its winning positions, and dW, db from the same weight-gradient kernel
        autograd calls. No graph, no saved tensors, no input gradients.
        ``tests/test_closed_form.py`` checks that the weights follow the autograd path step for
        step. In bf16 only the synapse's forward and weight gradient take bf16 inputs (P, the
        weight and bias, dL/dU), as autocast would give them; their results return to fp32.
        ``update`` (an optimiser's ``FusedUpdate``): apply it to the weights here, inside the
        compiled graph, instead of leaving the step to the optimiser.
        """
        net = self.network
        low = None if self.compute_dtype == torch.float32 else self.compute_dtype
        new_state, readouts, losses, spikes, grads = [], [], [], [], []
        for i, (layer, readout) in enumerate(zip(net.layers, net.readouts)):
            params, syn = layer.params, layer.synapse
            x = layer.format_input(x)
            st = layer.initial_state(x) if state is None else state[i]
            p, q = input_trace_step(x, st.p, st.q, params)
            # as in decolle_step, operation for operation
            if low is None:
                u_syn = syn(p)
            else:
                p_low, w_low = p.to(low), syn.weight.to(low)
                u_syn = _synapse_forward(syn, p_low, w_low).to(p.dtype)
            r_before_pool = layer.pool is not None and params.refractory == "before_pool"
            if r_before_pool:
                u_syn = torch.sub(u_syn, st.r, alpha=params.rho)
            if layer.pool is not None:
                k = layer.pool.kernel_size
                u, where = F.max_pool2d_with_indices(u_syn, k, k)
            else:
                u = u_syn
            if not r_before_pool:
                u = torch.sub(u, st.r, alpha=params.rho)
            s = fires(u, params.spike_at_zero)
            r = torch.lerp(fires(u_syn, params.spike_at_zero) if r_before_pool else s, st.r, params.gamma)
            new_state.append(DecolleState(p, q, r))
            spikes.append(s)

            rand = net.dropout.draw(s) if rands[i] is None else rands[i]
            keep = None if rand is None else keep_mask(rand, net.dropout.p)
            g, h = readout.matched(s)[1:] if matched[i] is None else matched[i]
            y = flat_in_memory_order(s if keep is None else s * keep) @ g.t()
            if readout.bias is not None:
                y = y + readout.bias
            readouts.append(y)
            loss = local_loss(y, labels, self.loss, target)
            losses.append(loss + regulariser(u, self.reg1, self.reg2) if self.reg1 or self.reg2 else loss)
            grad_u = unflatten_like(loss_grad(y, target, self.loss) @ h, s)
            if keep is not None:
                grad_u = grad_u * keep
            grad_u = grad_u * surrogate_derivative(u, layer.surrogate)
            if self.reg1 or self.reg2:
                grad_u = grad_u + regulariser_grad(u, self.reg1, self.reg2)
            if layer.pool is not None:
                grad_u = torch.ops.aten.max_pool2d_with_indices_backward(
                    grad_u, u_syn, [k, k], [k, k], [0, 0], [1, 1], False, where)
            if low is not None:
                gw, gb = _synapse_weight_grad(syn, grad_u, p_low, w_low)
            elif isinstance(syn, torch.nn.Conv2d):
                w = syn.weight
                _, gw, gb = torch.ops.aten.convolution_backward(
                    grad_u, p, w, None if syn.bias is None else [w.shape[0]], syn.stride,
                    syn.padding, syn.dilation, False, [0, 0], syn.groups,
                    [False, True, syn.bias is not None])
            else:
                gw = grad_u.t() @ p
                gb = grad_u.sum(0) if syn.bias is not None else None
            grads.append((gw, gb))
            x = s
        if update is not None:
            update.update(self._learned_parameters(), _present(grads), *update.state)
        return new_state, readouts, losses, spikes, grads


def _present(grads: list[tuple[Tensor, Tensor | None]]) -> list[Tensor]:
    """The weight and bias gradients of every layer, in one list (no bias: none)."""
    return [g for pair in grads for g in pair if g is not None]


def _synapse_forward(syn: torch.nn.Linear | torch.nn.Conv2d, p: Tensor, w: Tensor) -> Tensor:
    """The synapse's forward on ``p`` with the weight ``w`` (and its bias in ``w``'s dtype)."""
    bias = None if syn.bias is None else syn.bias.to(w.dtype)
    if isinstance(syn, torch.nn.Conv2d):
        return F.conv2d(p, w, bias, syn.stride, syn.padding, syn.dilation, syn.groups)
    return F.linear(p, w, bias)


def _synapse_weight_grad(syn: torch.nn.Linear | torch.nn.Conv2d, grad_u: Tensor, p: Tensor,
                         w: Tensor) -> tuple[Tensor, Tensor | None]:
    """(dW, db) of the synapse, in its weights' dtype, for dL/dU ``grad_u`` and input ``p`` with
    weight ``w`` in a lower precision: dW from the weight-gradient kernel in ``w``'s dtype (it
    accumulates in fp32), db summed in ``grad_u``'s dtype."""
    g = grad_u.to(w.dtype)
    if isinstance(syn, torch.nn.Conv2d):
        _, gw, _ = torch.ops.aten.convolution_backward(
            g, p, w, None, syn.stride, syn.padding, syn.dilation, False, [0, 0], syn.groups,
            [False, True, False])
        dims = (0, 2, 3)
    else:
        gw = g.t() @ p
        dims = (0,)
    return gw.to(syn.weight.dtype), None if syn.bias is None else grad_u.sum(dims)


def _like_spikes(layer: DecolleLayer, r: Tensor) -> Tensor:
    """An uninitialised tensor with the shape and memory layout of the layer's spikes S, from
    its refractory trace R (S has R's layout; R is unpooled when it is kept before the pool)."""
    if layer.pool is None or layer.params.refractory != "before_pool":
        return r
    k = layer.pool.kernel_size
    b, c, hh, ww = r.shape
    fmt = torch.channels_last if is_channels_last(r) else torch.contiguous_format
    return torch.empty((b, c, hh // k, ww // k), dtype=r.dtype, device=r.device, memory_format=fmt)


class ErrorTrigger:
    """Error-triggered DECOLLE (Payvand, Fouda, Kurdahi, Eltawil & Neftci, AICAS 2020).

    The error of neuron i at a step, E_i = dL/dS_i (Eq. 8: sum_k G_ki (Y_k - Yhat_k) for MSE),
    is sent to the synapses only as an *error event*, when |E_i| > threshold; otherwise the
    neuron's synapses are not updated at that step. ``mode="gate"`` sends the error itself,
    ``"ternary"`` sends threshold * sign(E_i) (a 1.5-bit event, as on a crossbar). A layer with no
    event at a step is not updated at all (its parameters get no gradient, so the optimiser
    skips them). With ``target_rate`` the threshold of every layer follows the fraction of
    (sample, neuron) pairs that sent an event:
    log(threshold) += adapt * clip((rate - target) / target, -1, 1) after every step; a zero
    threshold starts at the (1 - target) quantile of |E| of the first step. Threshold 0 without a
    target is plain DECOLLE (every non-zero error is sent, nothing is quantised).
    """

    def __init__(
        self,
        threshold: float | None = None,
        target_rate: float | None = None,
        adapt: float = 0.1,
        mode: Literal["gate", "ternary"] = "gate",
    ) -> None:
        if mode not in ("gate", "ternary"):
            raise ValueError(f"unknown error_trigger mode {mode!r}; valid: gate, ternary")
        self.initial = float(threshold or 0.0)
        self.target_rate = target_rate
        self.adapt = adapt
        self.mode = mode
        self.thresholds: list[float] | None = None  # one per layer, kept across sequences

    def start_sequence(self, n_layers: int) -> None:
        if self.thresholds is None:
            self.thresholds = [self.initial] * n_layers
        self._events = [0] * n_layers
        self._signals = [0] * n_layers
        self._steps_with_event = [0] * n_layers
        self._steps = 0
        self._step_events = [0] * n_layers

    def hook(self, i: int):
        """A tensor hook for layer i's spikes: gates dL/dS and counts the events."""

        def gate(grad: Tensor) -> Tensor:
            th = self.thresholds[i]
            if th == 0.0 and self.target_rate is not None:
                th = torch.quantile(grad.detach().abs().flatten().float(), 1.0 - self.target_rate).item()
                self.thresholds[i] = th
            event = grad.abs() > th
            n = int(event.sum())
            self._events[i] += n
            self._step_events[i] = n
            self._signals[i] += grad.numel()
            if self.target_rate is not None and th > 0:
                rate = n / grad.numel()
                err = max(-1.0, min(1.0, (rate - self.target_rate) / self.target_rate))
                self.thresholds[i] = th * math.exp(self.adapt * err)
            if self.mode == "ternary" and th > 0:
                return th * torch.sign(grad) * event
            return grad * event

        return gate

    def end_step(self, network) -> None:
        """After backward(): layers without an event this step get no update at all."""
        self._steps += 1
        for i, layer in enumerate(network.layers):
            if self._step_events[i] > 0:
                self._steps_with_event[i] += 1
            elif self.thresholds[i] > 0:
                for p in layer.parameters():
                    p.grad = None
            self._step_events[i] = 0

    def stats(self) -> dict:
        """update_fraction: per layer, the fraction of (step, sample, neuron) that sent an error
        event; step_fraction: the fraction of steps at which the layer was updated."""
        n = len(self._events)
        return {
            "update_fraction": [self._events[i] / max(self._signals[i], 1) for i in range(n)],
            "step_fraction": [self._steps_with_event[i] / max(self._steps, 1) for i in range(n)],
            "threshold": list(self.thresholds),
        }
