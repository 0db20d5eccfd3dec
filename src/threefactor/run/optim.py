"""Adamax for one optimiser step per time step.

DECOLLE steps the optimiser at every time step, so the fixed cost of a step matters as much
as its arithmetic: for a small network, torch's ``Adamax.step`` spends most of its time in
Python bookkeeping (``_init_group``, grouping tensors by device, step-counter handling).
``Adamax`` here is ``torch.optim.Adamax`` with a lean step for the common case: torch's
multi-tensor arithmetic on the same state, so checkpoints, LR schedulers and step hooks keep
working; anything it does not model goes to torch's own step.
"""

from __future__ import annotations

import warnings

import torch


def _adamax_update(params, grads, exp_infs, lr: float, beta2: float, eps: float) -> None:
    """exp_inf = max(beta2 exp_inf, |g| + eps); p -= lr g / exp_inf (beta1 = 0: exp_avg is g).
    torch.compile fuses it into one pass over each tensor instead of five."""
    for p, g, e in zip(params, grads, exp_infs):
        e.copy_(torch.maximum(e * beta2, g.abs() + eps))
        p.add_((g / e) * -lr)


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

    def _fused_update(self, params, grads, exp_infs, lr: float, beta2: float, eps: float) -> bool:
        """The compiled update; False where it is not used (compiler errors come before
        anything has run, so the caller's eager update starts from the same state)."""
        if not self.compile or self._compiled_update is False:
            return False
        if self._compiled_update is None:
            self._compiled_update = torch.compile(_adamax_update)
        try:
            self._compiled_update(params, grads, exp_infs, lr, beta2, eps)
        except Exception as err:  # noqa: BLE001 - a compiler failure falls back to eager
            self._compiled_update = False
            first = str(err).splitlines()[0] if str(err) else ""
            warnings.warn(f"Adamax(compile=True): torch.compile failed ({type(err).__name__}: {first}); "
                          "the update continues eagerly", RuntimeWarning, stacklevel=3)
            return False
        return True

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
            states = [self.state[p] for p in params]
            for p, st in zip(params, states):
                if not st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_inf"] = torch.zeros_like(p, memory_format=torch.preserve_format)
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
