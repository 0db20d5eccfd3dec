"""The number format the rules compute in: ``fp32``, or ``bf16`` with fp32 master weights.

``bf16`` runs the synapses' products (convolutions and dense products, forward and weight
gradient) in bfloat16 and everything else in fp32: the weights, their gradients and the
optimiser state, the traces (P, Q, R, S-TLLR's), membranes, readouts, losses and votes.
Spikes are 0 or 1, exact in bf16; the products accumulate in fp32 inside the kernels, so a
step differs from fp32 by the rounding of its inputs (P, the weight) and outputs to 8
significant bits. ``auto`` is ``bf16`` where the device computes bf16 natively (a CPU with
AVX512-BF16 or AMX-BF16, a CUDA device of compute capability 8.0 or later) and ``fp32``
elsewhere, where bf16 would be emulated and slower.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Literal

import torch

Precision = Literal["fp32", "bf16", "auto"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "auto")
# CPU flags (Linux /proc/cpuinfo names) of native bf16 dot products
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The flags of this machine's first CPU as Linux lists them (empty where there is no
    ``/proc/cpuinfo``: another system, where ``auto`` then keeps fp32)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """The compute capability of a CUDA ``device``, or None when it is not one."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def native_bf16(device: torch.device, flags: frozenset[str] | None = None,
                capability: tuple[int, int] | None = None) -> bool:
    """Whether ``device`` computes bf16 natively. ``flags`` (a CPU's) and ``capability`` (a
    CUDA device's) default to those of this machine."""
    if device.type == "cpu":
        return bool(BF16_CPU_FLAGS & (cpu_flags() if flags is None else flags))
    if device.type == "cuda":
        cap = cuda_capability(device) if capability is None else capability
        return cap is not None and cap >= (8, 0)
    return False


def resolve_precision(name: str, device: torch.device | str, flags: frozenset[str] | None = None,
                      capability: tuple[int, int] | None = None) -> Literal["fp32", "bf16"]:
    """``fp32`` or ``bf16`` for the setting ``name`` on ``device`` (``auto``: ``bf16`` where
    ``native_bf16`` says so)."""
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; valid: {', '.join(PRECISIONS)}")
    if name == "auto":
        return "bf16" if native_bf16(torch.device(device), flags, capability) else "fp32"
    return name


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype of the synapses' products at a resolved ``precision`` (fp32 or bf16)."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision {precision!r} is not resolved; expected fp32 or bf16 "
                         "(resolve_precision turns auto into one of them)")
    return torch.bfloat16 if precision == "bf16" else torch.float32


def parameter_device(module: torch.nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (the CPU for a module without any)."""
    return next(module.parameters(), torch.empty(0)).device


def autocast(precision: str, device: torch.device | str):
    """The context in which a module's products run at ``precision`` (resolved): ``torch.autocast``
    to bf16 on the device's type, or nothing at fp32. Outputs of the products come out in bf16."""
    dtype = compute_dtype(precision)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
