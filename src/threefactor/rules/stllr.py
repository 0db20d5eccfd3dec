"""S-TLLR (Apolinario & Roy, TMLR): an STDP-inspired three-factor rule for soft-reset LIF networks.

Per synapse (i post, j pre) the eligibility is

    e_ij[t] = a_pre Psi(u_i[t]) trace_pre_j[t] + a_post x_j[t] trace_post_i[t-1]
    trace_pre[t] = l_pre trace_pre[t-1] + x[t],   trace_post[t] = l_post trace_post[t-1] + Psi(u[t])

(causal, STDP-like LTP term plus a non-causal term), and the update is
dW = -lr sum_{t >= T_l} delta_i[t] e_ij[t] with delta[t] = dL[t]/dy[t] the learning signal of a
per-step loss, carried across layers at the same step (backprop through layers, or direct
feedback alignment) but never through time.

Only the two neuron-level traces are kept, never e_ij itself: the weight gradient of one step is

    a_pre (delta * Psi(u))^T @ trace_pre  +  a_post (delta * trace_post[t-1])^T @ x

i.e. the weight-gradient map of the synapse (matrix product for dense layers,
``torch.nn.grad.conv2d_weight`` for convolutions) applied to the traces, so memory does not
depend on the number of steps T. ``precision="bf16"`` runs the synapses' forward under
``torch.autocast`` and both weight-gradient maps on bf16 copies of their inputs (fp32 results);
the traces, learning signals and losses stay fp32 (``model.precision``). Recurrent synapses (dense layers) have the layer's own spikes
of the previous step as input. The bias update is sum_b Psi(u) delta (``bias_update:
psi_delta``, the authors' code), or that of a synapse from a constant input 1 with its own
trace (``synapse``). Psi is also the spike's derivative through which a backpropagated learning
signal crosses each layer, as in the authors' code.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from ..model.layers import LIFLayer
from ..model.network import DecolleNetwork
from ..model.neurons import LIFState, detach_lif_state
from ..model.precision import Precision, autocast, compute_dtype, parameter_device, resolve_precision
from ..model.surrogates import LIF_SURROGATES, LIFSurrogate
from .common import Loss, SequenceResult, SequenceTally, local_loss, resolve_loss

LearningSignal = Literal["backprop", "dfa", "local"]
LEARNING_SIGNALS: tuple[str, ...] = ("backprop", "dfa", "local")
PsiName = LIFSurrogate | Literal["authors"]
PSIS: tuple[str, ...] = ("authors", *LIF_SURROGATES)
BiasUpdate = Literal["psi_delta", "synapse"]
BIAS_UPDATES: tuple[str, ...] = ("psi_delta", "synapse")


class STLLRFactors(NamedTuple):
    """[lambda_post, lambda_pre, alpha_post, alpha_pre], in the order of the paper's tables."""

    lambda_post: float = 0.2
    lambda_pre: float = 0.75
    alpha_post: float = -1.0
    alpha_pre: float = 1.0


VISION = STLLRFactors(0.2, 0.75, -1.0, 1.0)  # DVS Gesture, N-CALTECH101, CIFAR10-DVS
SHD = STLLRFactors(0.5, 1.0, 1.0, 1.0)  # Spiking Heidelberg Digits


class Traces(NamedTuple):
    """The S-TLLR state of one layer: everything the rule keeps across steps (besides the LIF state)."""

    pre: Tensor  # trace of the layer's input x, one per input neuron (shape of x)
    post: Tensor  # trace of Psi(u), one per neuron (shape of u)
    pre_rec: Tensor | None  # trace of the recurrent input s[t-1] (recurrent layers only)
    pre_bias: Tensor  # trace of the bias's constant input 1 (a scalar; bias_update synapse)


# --- the pure pieces ---------------------------------------------------------------------


def trace_step(
    x: Tensor, psi: Tensor, pre: Tensor, post: Tensor, factors: STLLRFactors
) -> tuple[Tensor, Tensor]:
    """(trace_pre[t], trace_post[t]) from the traces of step t-1, input x[t] and Psi(u[t])."""
    return factors.lambda_pre * pre + x, factors.lambda_post * post + psi


def eligibility(
    x: Tensor, psi: Tensor, pre: Tensor, post_prev: Tensor, factors: STLLRFactors
) -> Tensor:
    """e_ij[t] of a dense synapse, materialised (B, out, in). For tests and small examples only:
    the rule itself never forms it. ``pre`` is trace_pre[t], ``post_prev`` trace_post[t-1]."""
    return (factors.alpha_pre * psi[:, :, None] * pre[:, None, :]
            + factors.alpha_post * post_prev[:, :, None] * x[:, None, :])


def synapse_weight_grad(synapse: nn.Linear | nn.Conv2d, z: Tensor, g: Tensor,
                        dtype: torch.dtype | None = None) -> Tensor:
    """sum_b g_b^T z_b through the synapse's weight map: d<g, W z>/dW without autograd; with
    ``dtype`` (e.g. bf16) the product takes ``z`` and ``g`` in it and the result comes back in
    the weight's dtype."""
    if dtype is not None:
        return synapse_weight_grad(synapse, z.to(dtype), g.to(dtype)).to(synapse.weight.dtype)
    if isinstance(synapse, nn.Linear):
        return g.flatten(1).t() @ z.flatten(1)
    return torch.nn.grad.conv2d_weight(
        z, synapse.weight.shape, g, synapse.stride, synapse.padding, synapse.dilation, synapse.groups
    )


def eligibility_grad(
    synapse: nn.Linear | nn.Conv2d,
    delta: Tensor,
    x: Tensor,
    psi: Tensor,
    pre: Tensor,
    post_prev: Tensor,
    factors: STLLRFactors,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """sum_b delta_i[t] e_ij[t] for the weights of ``synapse``, without materialising e:
    a_pre (delta * Psi)^T @ trace_pre + a_post (delta * trace_post[t-1])^T @ x. Both terms go
    through one weight-gradient call (its product in ``dtype``) by stacking them along the batch."""
    zs, gs = [], []
    if factors.alpha_pre != 0:
        zs.append(pre)
        gs.append(factors.alpha_pre * delta * psi)
    if factors.alpha_post != 0:
        zs.append(x)
        gs.append(factors.alpha_post * delta * post_prev)
    if not zs:
        return torch.zeros_like(synapse.weight)
    z = zs[0] if len(zs) == 1 else torch.cat(zs)
    g = gs[0] if len(gs) == 1 else torch.cat(gs)
    return synapse_weight_grad(synapse, z, g, dtype)


# --- the rule ------------------------------------------------------------------------------


class STLLRRule:
    """Runs sequences through a network of ``LIFLayer``s (``network.neuron_model: lif``) and
    applies S-TLLR updates online.

    ``psi``: the secondary activation Psi (``lif_psi``), also the spike's derivative when the
    learning signal is backpropagated through the layers; ``authors`` is ``authors_linear`` on
    dense layers and ``authors_conv`` on conv layers. ``bias_update``: ``psi_delta`` (db = sum
    Psi delta) or ``synapse`` (the eligibility of a synapse from a constant input 1).
    ``learning_signal``: ``backprop`` carries dL/dy back through the layers at the same step
    (through Psi, no time); ``dfa`` sends the last readout's error e = dL/dY through a
    fixed random matrix to every hidden layer (delta_l = e B_l, plus the layer's own readout
    error when ``loss_layers`` is ``all``); ``local`` uses each layer's own readout error only
    (DECOLLE-style locality). ``loss_layers``: which readouts form the per-step loss.
    ``update``: ``step`` applies an optimiser step every time step t >= ``burn_in`` (T_l);
    ``sequence`` accumulates sum_t delta e over the sequence and steps once at its end.
    """

    def __init__(
        self,
        network: DecolleNetwork,
        optimizer: torch.optim.Optimizer,
        factors: STLLRFactors = VISION,
        psi: PsiName = "boxcar",
        learning_signal: LearningSignal = "backprop",
        update: Literal["step", "sequence"] = "step",
        loss: Loss = "smooth_l1",
        burn_in: int = 0,
        loss_layers: Literal["all", "last"] = "all",
        feedback_scale: float = 0.5,
        seed: int = 0,
        bias_update: BiasUpdate = "synapse",
        precision: Precision = "fp32",
    ) -> None:
        for i, layer in enumerate(network.layers):
            # the rule reads the LIF layer's synapse, Psi and spikes before pooling (docs/rules.md)
            if not isinstance(layer, LIFLayer):
                raise ValueError(f"the stllr rule needs LIF layers (network.neuron_model: lif); layer {i} "
                                 f"is a {type(layer).__name__}")
        loss = resolve_loss(loss)
        for name, value, valid in (("psi", psi, PSIS),
                                   ("bias_update", bias_update, BIAS_UPDATES),
                                   ("learning_signal", learning_signal, LEARNING_SIGNALS),
                                   ("update", update, ("step", "sequence")),
                                   ("loss_layers", loss_layers, ("all", "last"))):
            if value not in valid:
                raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
        self.network = network
        self.optimizer = optimizer
        self.factors = STLLRFactors(*factors)
        self.psi = psi
        self.bias_update = bias_update
        self.learning_signal = learning_signal
        self.update = update
        self.loss = loss
        self.burn_in = burn_in
        self.loss_layers = loss_layers
        self.feedback_scale = feedback_scale
        self.seed = seed
        self.feedback: list[Tensor] | None = None  # DFA matrices, made on first use
        self.traces: list[Traces] | None = None  # the traces at the end of the last sequence
        self.precision = resolve_precision(precision, parameter_device(network))
        self.compute_dtype = compute_dtype(self.precision)
        self._product_dtype = None if self.precision == "fp32" else self.compute_dtype  # None: as the weights

    # -- pieces of one step --

    def _forward(self, x: Tensor, states: list[LIFState | None]):
        """One step through every layer; the graph crosses layers only for ``backprop``."""
        inputs, outs, new_states = [], [], []
        h = x
        for i, layer in enumerate(self.network.layers):
            xin = layer.format_input(h)
            if self.learning_signal != "backprop":
                xin = xin.detach()
            st = states[i] if states[i] is not None else layer.initial_state(xin)
            out, new = layer(xin, st, self.psi)
            inputs.append(xin.detach())
            outs.append(out)
            new_states.append((st, new))
            h = out.s
        return inputs, outs, new_states

    def _feedback(self, outs) -> list[Tensor]:
        if self.feedback is None:
            gen = torch.Generator().manual_seed(self.seed + 7919)
            n_classes = self.network.readouts[-1].g.shape[0]
            mats = []
            for out in outs[:-1]:
                n = out.s_neurons[0].numel()
                bound = self.feedback_scale / math.sqrt(n)
                mats.append(((torch.rand(n_classes, n, generator=gen) * 2 - 1) * bound)
                            .to(out.s_neurons.device, out.s_neurons.dtype))
            self.feedback = mats
        return self.feedback

    def _signal(self, outs, labels: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Per-layer losses (L,) and the learning signals delta_l = dL/dy_l at this step."""
        net = self.network
        ys = [r(net.dropout(o.s)) for r, o in zip(net.readouts, outs)]
        losses = torch.stack([local_loss(y, labels, self.loss, layer=i) for i, y in enumerate(ys)])
        objective = losses.sum() if self.loss_layers == "all" else losses[-1]
        targets = [o.s_neurons for o in outs]
        if self.learning_signal == "dfa":
            targets.append(ys[-1])
        grads = torch.autograd.grad(objective, targets, allow_unused=True)
        deltas = [torch.zeros_like(o.s_neurons) if g is None else g for o, g in zip(outs, grads)]
        if self.learning_signal == "dfa":
            e = grads[-1]
            for i, b in enumerate(self._feedback(outs)):
                deltas[i] = deltas[i] + (e @ b).view_as(deltas[i])
        return losses.detach(), deltas

    # -- a sequence --

    def train_sequence(self, x: Tensor, labels: Tensor) -> SequenceResult:
        """Learn from one batch of sequences ``x`` (B, T, ...) with class ``labels`` (B,)."""
        net, f = self.network, self.factors
        n_layers, steps = len(net.layers), x.shape[1]
        tally = SequenceTally(net, x, self.burn_in)
        nonzero = x.new_zeros(n_layers)
        n_signal = [0] * n_layers
        states: list[LIFState | None] = [None] * n_layers
        traces: list[Traces | None] = [None] * n_layers
        accumulated: dict[nn.Parameter, Tensor] = {}
        n_steps = 0
        for t in range(steps):
            learn = t >= self.burn_in
            with torch.set_grad_enabled(learn):
                with autocast(self.precision, x.device):
                    inputs, outs, new_states = self._forward(x[:, t], states)
                tally.count_spikes([o.s for o in outs])
                if learn:
                    losses, deltas = self._signal(outs, labels)
            grads: dict[nn.Parameter, Tensor] = {}
            with torch.no_grad():
                for i, layer in enumerate(net.layers):
                    xin, (st_prev, st_new) = inputs[i], new_states[i]
                    u = st_new.u.detach()
                    psi = layer.psi(u, self.psi)
                    tr = traces[i]
                    if tr is None:
                        tr = Traces(torch.zeros_like(xin), torch.zeros_like(u),
                                    torch.zeros_like(u) if layer.recurrent is not None else None,
                                    u.new_zeros(()))
                    pre, _ = trace_step(xin, psi, tr.pre, tr.post, f)
                    pre_bias = f.lambda_pre * tr.pre_bias + 1.0
                    s_prev = st_prev.s.detach()
                    pre_rec = None if tr.pre_rec is None else f.lambda_pre * tr.pre_rec + s_prev
                    if learn:
                        d = deltas[i]
                        nonzero[i] += (d != 0).sum()
                        n_signal[i] += d.numel()
                        self._layer_grads(layer, d, xin, psi, pre, tr.post, pre_bias, s_prev, pre_rec, grads)
                    traces[i] = Traces(pre, f.lambda_post * tr.post + psi, pre_rec, pre_bias)
            if learn:
                if self.update == "step":
                    self.optimizer.zero_grad(set_to_none=True)
                    for p, g in grads.items():
                        p.grad = g
                    self.optimizer.step()
                    n_steps += 1
                else:
                    for p, g in grads.items():
                        accumulated[p] = accumulated[p] + g if p in accumulated else g
                tally.count_step(self._readouts(outs), losses)
            states = [detach_lif_state(new) for _, new in new_states]
        if self.update == "sequence" and accumulated:
            self.optimizer.zero_grad(set_to_none=True)
            for p, g in accumulated.items():
                p.grad = g
            self.optimizer.step()
            n_steps += 1
        self.traces = traces
        return tally.result({
            "update_fraction": [(nonzero[i] / max(n_signal[i], 1)).item() for i in range(n_layers)],
            "optimizer_steps": n_steps,
        })

    def _readouts(self, outs) -> list[Tensor]:
        """The readouts that vote (no dropout, no graph)."""
        with torch.no_grad():
            return [r(o.s) for r, o in zip(self.network.readouts, outs)]

    def _layer_grads(self, layer: LIFLayer, d, xin, psi, pre, post_prev, pre_bias, s_prev, pre_rec, grads):
        f = self.factors
        syn = layer.synapse
        grads[syn.weight] = eligibility_grad(syn, d, xin, psi, pre, post_prev, f, self._product_dtype)
        if syn.bias is not None:
            dims = [0] + list(range(2, d.dim()))
            if self.bias_update == "psi_delta":
                grads[syn.bias] = (d * psi).sum(dims)
            else:
                grads[syn.bias] = (f.alpha_pre * pre_bias * (d * psi).sum(dims)
                                   + f.alpha_post * (d * post_prev).sum(dims))
        if layer.recurrent is not None:
            grads[layer.recurrent.weight] = eligibility_grad(
                layer.recurrent, d, s_prev, psi, pre_rec, post_prev, f, self._product_dtype
            )
