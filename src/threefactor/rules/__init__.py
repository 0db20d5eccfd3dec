"""Learning rules: each decides what to detach, which losses to form and when to step.

Every rule follows the ``Rule`` protocol (``rules.common``): ``train_sequence(x, labels) ->
SequenceResult(votes (L, B, C), loss (L,), rates (L,), stats)``; the local loss is a built-in
name or any user cost ``cost(readout, target, layer_index) -> scalar``;
evaluation is ``predict_sequence`` for every rule and network. ``make_rule`` picks one from
the config (``rule.name: decolle | stllr | bptt``); every rule computes at ``train.precision``
(``fp32``, ``bf16`` with fp32 master weights, or ``auto``: ``model.precision``), resolved for
the network's device (the rule's ``precision`` says which). DECOLLE and BPTT train any layer that keeps
the step contract (``DecolleNetwork.from_layers``); S-TLLR needs ``LIFLayer``s.
"""

from __future__ import annotations

from .bptt import BPTTRule
from .common import (
    LOSSES, LocalCost, LocalCostError, Rule, SequenceResult, layer_losses, local_loss,
    predict_sequence, regulariser, resolve_loss,
)
from .decolle import DecolleRule, ErrorTrigger
from .stllr import SHD, VISION, STLLRFactors, STLLRRule

RULES: tuple[str, ...] = ("decolle", "stllr", "bptt")


def make_rule(cfg, network, optimizer):
    """The learning rule of ``cfg`` (a ``Config``) for ``network`` and ``optimizer``."""
    r = cfg.rule
    if r.name == "decolle":
        et = r.error_trigger
        trigger = None
        if et.threshold is not None or et.target_rate is not None:
            trigger = ErrorTrigger(et.threshold, et.target_rate, et.adapt, et.mode)
        return DecolleRule(network, optimizer, r.loss, r.reg1, r.reg2, r.burn_in, error_trigger=trigger,
                           closed_form=r.closed_form, compile=r.compile, precision=cfg.train.precision)
    if r.name == "stllr":
        s = r.stllr
        return STLLRRule(
            network, optimizer, STLLRFactors(*s.factors), s.psi or cfg.network.surrogate,
            s.learning_signal, s.update, r.loss, r.burn_in, r.loss_layers,
            feedback_scale=cfg.network.readout_scale, seed=cfg.seed, bias_update=s.bias_update,
            precision=cfg.train.precision,
        )
    if r.name == "bptt":
        return BPTTRule(network, optimizer, r.loss, r.reg1, r.reg2, r.burn_in, r.loss_layers,
                        precision=cfg.train.precision, window=r.bptt_window)
    raise ValueError(f"unknown rule {r.name!r}; valid: {', '.join(RULES)}")


__all__ = [
    "BPTTRule", "DecolleRule", "ErrorTrigger", "LOSSES", "LocalCost", "LocalCostError", "RULES", "Rule",
    "SHD", "STLLRFactors", "STLLRRule", "SequenceResult", "VISION", "layer_losses", "local_loss",
    "make_rule", "predict_sequence", "regulariser", "resolve_loss",
]
