"""Adamax for one optimiser step per time step.

DECOLLE steps the optimiser at every time step, so the fixed cost of a step matters as much
as its arithmetic: for a small network, torch's ``Adamax.step`` spends most of its time in
Python bookkeeping (``_init_group``, grouping tensors by device, step-counter handling).
``Adamax`` here is ``torch.optim.Adamax`` with a lean step for the common case: torch's
multi-tensor arithmetic on the same state, so checkpoints, LR schedulers and step hooks keep
working; anything it does not model goes to torch's own step.

A rule whose step is compiled can also take the update into its own compiled graph
(``Adamax.fused_update``): one compiled call per time step instead of the step's own
multi-tensor calls, which for a small network cost as much as the step's arithmetic.
"""

from __future__ import annotations

import warnings
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor


def adamax_update(params, grads, exp_infs, lrs, beta2: float, eps: float) -> None:
    """exp_inf = max(beta2 exp_inf, |g| + eps); p -= lr g / exp_inf (beta1 = 0: exp_avg is g),
    with ``lrs`` one learning rate (a number or a 0-d tensor) per parameter. torch.compile fuses
    it into one pass over each tensor instead of five."""
    for p, g, e, lr in zip(params, grads, exp_infs, lrs):
        e.copy_(torch.maximum(e * beta2, g.abs() + eps))
        p.add_((g / e) * -lr)


class FusedUpdate(NamedTuple):
    """An optimiser's next step as a pure function and its state, for a compiled step to apply
    in its own graph: ``update(params, grads, *state)`` changes the parameters and the state in
    place; then the optimiser's ``fused_step_done(params, grads)`` records the step."""

    update: Callable
    state: tuple


class Adamax(torch.optim.Adamax):
    """``torch.optim.Adamax`` (same arguments, same state, same updates) with a lean ``step``.

    With ``compile=True`` the update of the common DECOLLE case (beta1 = 0) runs through
    ``torch.compile``: one fused pass over weights, gradients and state; where compiling fails
    it warns once and goes on eagerly.
    """

    def __init__(self, params, *args, compile: bool = False, **kwargs) -> None:
        super().__init__(params, *args, **kwargs)
        self.compile = compile
        self._compiled_update = None  # False once compiling failed
        self._lr_tensors: dict[int, tuple[float, Tensor]] = {}  # per group: its lr, as a 0-d tensor too

    def _fused_update(self, params, grads, exp_infs, lr: float, beta2: float, eps: float) -> bool:
        """The compiled update; False where it is not used (compiler errors come before
        anything has run, so the caller's eager update starts from the same state)."""
        if not self.compile or self._compiled_update is False:
            return False
        if self._compiled_update is None:
            self._compiled_update = torch.compile(adamax_update)
        try:
            self._compiled_update(params, grads, exp_infs, [lr] * len(params), beta2, eps)
        except Exception as err:  # noqa: BLE001 - a compiler failure falls back to eager
            self._compiled_update = False
            first = str(err).splitlines()[0] if str(err) else ""
            warnings.warn(f"Adamax(compile=True): torch.compile failed ({type(err).__name__}: {first}); "
                          "the update continues eagerly", RuntimeWarning, stacklevel=3)
            return False
        return True

    def fused_update(self, params: Sequence[Tensor]) -> FusedUpdate | None:
        """This optimiser's next step of ``params`` (all of them with a gradient this step) as a
        ``FusedUpdate`` of ``adamax_update``, where that is the whole step: beta1 = 0, no weight
        decay, nothing ``step`` hands to torch's own, no step hooks on this optimiser (a
        data-parallel run averages gradients in one: ``run.collective``); a parameter without
        state gets it, as a first step makes it. None otherwise: then call
        ``step``. (Hooks registered for all optimisers, through torch's global registration,
        are not run for a fused step.)"""
        if self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks:
            return None
        where = {id(p): (i, g) for i, g in enumerate(self.param_groups) for p in g["params"]}
        settings = set()
        lrs = []
        for p in params:
            found = where.get(id(p))
            if found is None:
                return None
            i, g = found
            if (g["betas"][0] != 0 or g["weight_decay"] != 0 or g["maximize"] or g["capturable"]
                    or g["differentiable"] or torch.is_tensor(g["lr"]) or p.is_sparse or torch.is_complex(p)):
                return None
            settings.add((g["betas"][1], g["eps"], p.device, p.dtype))
            lrs.append(self._lr_tensor(i, g["lr"], p.device, p.dtype))
        if len(settings) != 1:
            return None
        exp_infs = [self._state_of(p)["exp_inf"] for p in params]
        (beta2, eps, _, _), = settings
        return FusedUpdate(adamax_update, (exp_infs, lrs, beta2, eps))

    def _state_of(self, p: Tensor) -> dict:
        """The state of ``p``, made as torch's first step makes it where it has none yet."""
        st = self.state[p]
        if not st:
            st["step"] = torch.tensor(0.0)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_inf"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st

    def _lr_tensor(self, group: int, lr: float, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The group's lr as a 0-d tensor, kept and refilled when it changes (a compiled step
        would recompile for every new lr given as a number)."""
        held, t = self._lr_tensors.get(group, (None, None))
        if t is None or t.device != device or t.dtype != dtype:
            t = torch.tensor(lr, device=device, dtype=dtype)
        elif held != lr:
            t.fill_(lr)
        self._lr_tensors[group] = (lr, t)
        return t

    @torch.no_grad()
    def fused_step_done(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        """Record a step that a ``FusedUpdate`` applied: the step counters, and the gradients
        as ``step`` leaves them (``p.grad``, and exp_avg, which beta1 = 0 makes the gradient)."""
        states = [self.state[p] for p in params]
        torch._foreach_add_([st["step"] for st in states], 1.0)
        for p, g, st in zip(params, grads, states):
            p.grad = g
            st["exp_avg"] = g

    @torch.no_grad()
    def step(self, closure=None):
        groups = [[p for p in g["params"] if p.grad is not None] for g in self.param_groups]
        if closure is not None or any(
            g["maximize"] or g["capturable"] or g["differentiable"] or torch.is_tensor(g["lr"])
            or len({(p.device, p.dtype) for p in params}) > 1  # torch groups these itself
            or any(p.grad.is_sparse or torch.is_complex(p) for p in params)
            for g, params in zip(self.param_groups, groups)
        ):
            return super().step(closure)
        # Groups that differ only in which tensors they hold (e.g. one per layer) share one
        # set of multi-tensor calls.
        buckets: dict[tuple, tuple[dict, list]] = {}
        for group, params in zip(self.param_groups, groups):
            key = (group["lr"], group["betas"], group["eps"], group["weight_decay"])
            buckets.setdefault(key, (group, []))[1].extend(params)
        for group, params in buckets.values():
            if not params:
                continue
            grads = [p.grad for p in params]
            states = [self._state_of(p) for p in params]
            steps = [st["step"] for st in states]
            exp_avgs = [st["exp_avg"] for st in states]
            exp_infs = [st["exp_inf"] for st in states]
            beta1, beta2 = group["betas"]
            torch._foreach_add_(steps, 1.0)
            if group["weight_decay"] != 0:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            # exp_avg.lerp_(grad, 1) is grad itself: hold it, no pass over memory (it is then
            # p.grad: zeroing grads in place zeroes it too, which beta1 = 0 never reads)
            if beta1 == 0:
                for st, g in zip(states, grads):
                    st["exp_avg"] = g
                exp_avgs = grads
            else:
                torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
            if beta1 == 0 and self._fused_update(params, grads, exp_infs, group["lr"], beta2, group["eps"]):
                continue
            torch._foreach_mul_(exp_infs, beta2)
            norms = torch._foreach_abs(grads)
            torch._foreach_add_(norms, group["eps"])
            torch._foreach_maximum_(exp_infs, norms)
            if beta1 == 0:  # no bias correction: the same step size for every tensor
                torch._foreach_addcdiv_(params, exp_avgs, exp_infs, -group["lr"])
            else:
                sizes = [-group["lr"] / (1 - beta1 ** s.item()) for s in steps]
                torch._foreach_addcdiv_(params, exp_avgs, exp_infs, sizes)
        return None
