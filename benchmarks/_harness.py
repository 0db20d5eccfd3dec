"""Shared pieces of the speed and memory benchmarks (not a benchmark itself).

- the paper's networks (DvsGesture, N-MNIST) as ``threefactor`` configs, and as the authors'
  released code (PyPI ``decolle==0.2``) builds them;
- random event input, analytic FLOP counts, the description of the machine;
- ``run_worker``: every measurement runs in a fresh ``python -m benchmarks.<name> --worker``
  subprocess with the thread count fixed in its environment, and prints one ``RESULT {json}``
  line that the parent collects.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import uuid
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULT_TAG = "RESULT "


# --- the networks of the paper ------------------------------------------------------------


@dataclass(frozen=True)
class PaperNet:
    """A conv stack with "same" padding on 2-channel event frames; by default the paper's:
    conv 7x7 64-128-128 with max-pool 2-1-2 on 2 x 32 x 32 input (Kaiser et al. 2020)."""

    name: str
    n_classes: int
    readout_scale: float  # a of G ~ U(-a/sqrt(fan_in), a/sqrt(fan_in)) in the authors' params files
    lr: float
    dense_output: bool  # N-MNIST: a 10-unit dense layer after the conv stack (as in the spec)
    input_shape: tuple[int, int, int] = (2, 32, 32)
    conv: tuple[tuple[int, int, int], ...] = ((64, 7, 2), (128, 7, 1), (128, 7, 2))  # channels, kernel, pool

    @property
    def layers(self) -> list[tuple[str, int, int, int]]:
        """(type, channels, kernel, pool) per layer."""
        conv = [("conv", c, k, p) for c, k, p in self.conv]
        return conv + ([("dense", self.n_classes, 1, 1)] if self.dense_output else [])


NETWORKS = {
    "dvsgesture": PaperNet("dvsgesture", 11, 2.0, 3.6e-4, dense_output=False),
    "nmnist": PaperNet("nmnist", 10, 0.5, 1e-3, dense_output=True),
    # the "small network" of the 1 kHz target: 3 conv layers, 3x3 8-16-16, pool 2-1-2, on
    # 2 x 16 x 16 frames (e.g. a DVS downsampled 8x); 3.6k weights, 1.8k neurons
    "small": PaperNet("small", 10, 0.5, 1e-3, dense_output=False, input_shape=(2, 16, 16),
                      conv=((8, 3, 2), (16, 3, 1), (16, 3, 2))),
}


def paper_config(net: PaperNet, rule: str = "decolle", burn_in: int = 0,
                 surrogate: str = "fast_sigmoid", ordering: str = "lagged", dropout: float = 0.5,
                 closed_form: bool = True, compile: bool = False, precision: str = "fp32"):
    """A ``threefactor.config.Config`` for ``net`` trained by ``rule`` with the authors' settings
    and formulation (decays 0.97 / 0.92 / 0.65, fast-sigmoid surrogate, lagged P, the refractory
    trace before the pool, spikes on U > 0, readout biases, dropout 0.5 into the readouts,
    smooth L1, Adamax betas (0, 0.95)): the same computation as their code (tests/
    test_decolle_public.py). ``stllr`` gets the same stack with soft-reset LIF neurons.
    ``closed_form=False`` makes DECOLLE take the autograd path (the before/after of the speed work);
    ``precision`` is ``train.precision`` (fp32, bf16, auto)."""
    from threefactor.config import (Config, LayerConfig, NetworkConfig, NeuronConfig,
                                    OptimConfig, RuleConfig, TrainConfig)

    layers = [LayerConfig(t, c, k, p) for t, c, k, p in net.layers]
    network = NetworkConfig(
        layers=layers,
        neuron=NeuronConfig(alpha=0.97, beta=0.92, gamma=0.65, rho=1.0, ordering=ordering,
                            refractory="before_pool", spike_at_zero=False),
        surrogate=surrogate, readout_scale=net.readout_scale, dropout=dropout, init="default",
        readout_bias=True,
    )
    if rule == "stllr":
        network.neuron_model = "lif"
    return Config(
        seed=0, device="cpu", network=network,
        rule=RuleConfig(name=rule, loss="smooth_l1", burn_in=burn_in, closed_form=closed_form,
                        compile=compile),
        optim=OptimConfig(name="adamax", lr=net.lr, betas=(0.0, 0.95), lr_decay_every=0),
        train=TrainConfig(precision=precision),
    )


def build_ours(net: PaperNet, rule: str = "decolle", **kw):
    """(network, optimizer, rule) of ``threefactor`` for ``net``, as ``threefactor train`` builds them."""
    from threefactor.model.network import build_network
    from threefactor.rules import make_rule
    from threefactor.run.from_config import make_optimizer

    cfg = paper_config(net, rule, **kw)
    network = build_network(cfg.network, net.input_shape, net.n_classes, cfg.seed)
    optimizer = make_optimizer(cfg, network)
    return network, optimizer, make_rule(cfg, network, optimizer)


def random_events(batch: int, steps: int, shape=(2, 32, 32), density: float = 0.02, seed: int = 0):
    """Float {0, 1} event frames (B, T, *shape), each pixel and polarity on with ``density``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return (torch.rand((batch, steps, *shape), generator=gen) < density).float()


def random_labels(batch: int, n_classes: int, seed: int = 1):
    import torch

    return torch.randint(0, n_classes, (batch,), generator=torch.Generator().manual_seed(seed))


# --- the authors' released code (PyPI decolle==0.2) ------------------------------------------


def authors_available() -> tuple[bool, str]:
    """(True, version) if ``decolle`` (the authors' package) imports, else (False, why)."""
    try:
        import decolle.base_model  # noqa: F401
        import decolle.lenet_decolle_model  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any failure means: skip that column
        return False, (f"the authors' package decolle==0.2 is not importable ({type(err).__name__}: "
                       f"{err}); install it with `.venv/bin/pip install --no-deps decolle==0.2`")
    try:
        from importlib.metadata import version

        return True, version("decolle")
    except Exception:  # noqa: BLE001
        return True, "unknown"


def build_authors(net: PaperNet, seed: int = 0):
    """``LenetDECOLLE`` as the authors' scripts build it from params_dvsgesture / params_nmnist
    (``net.conv``: for the paper's nets conv 7x7 64-128-128, pool 2-1-2; no MLP layers, LIFLayer neurons with fast-sigmoid,
    alpha 0.97, beta 0.92, alpharp 0.65, dropout 0.5, 'rtrl' = DECOLLE detaching), its
    ``DECOLLELoss`` of smooth L1 per layer and Adamax with betas (0, 0.95).
    N-MNIST adds their dense output layer (``with_output_layer``)."""
    import torch
    from decolle.base_model import DECOLLELoss, LIFLayer
    from decolle.lenet_decolle_model import LenetDECOLLE

    torch.manual_seed(seed)
    model = LenetDECOLLE(
        out_channels=net.n_classes, Nhid=[c for c, _, _ in net.conv], Mhid=[],
        kernel_size=[k for _, k, _ in net.conv], stride=[1], pool_size=[p for _, _, p in net.conv],
        input_shape=list(net.input_shape), alpha=[0.97], alpharp=[0.65],
        beta=[0.92], dropout=[0.5], num_conv_layers=len(net.conv), num_mlp_layers=0,
        lc_ampl=net.readout_scale, lif_layer_type=LIFLayer, method="rtrl",
        with_output_layer=net.dense_output,
    )
    with torch.no_grad():
        for layer in model.LIF_layers:
            layer.init_parameters()
    optimizer = torch.optim.Adamax(model.get_trainable_parameters(), lr=net.lr, betas=(0.0, 0.95))
    loss = DECOLLELoss(net=model, loss_fn=[torch.nn.SmoothL1Loss()] * len(model),
                       reg_l=[0.0] * len(model))
    return model, optimizer, loss


def authors_targets(labels, steps: int, n_classes: int):
    """One-hot targets repeated over time (B, T, C) and the loss mask, as utils.train makes them."""
    import torch.nn.functional as F

    target = F.one_hot(labels, n_classes).float().unsqueeze(1).expand(-1, steps, -1)
    mask = (target.sum(2) > 0).unsqueeze(2).float()
    return target, mask


def authors_train_steps(model, optimizer, loss_fn, x, target, mask, autocast: bool = False) -> None:
    """The body of decolle.utils.train for one batch, online_update=True, burnin 0; ``model.init``
    (their state reset, which runs one extra step without gradient) is left to the caller.
    ``autocast``: their step and loss under ``torch.autocast(device, torch.bfloat16)``, the
    backward and optimiser step outside it (what a user of their code could add)."""
    import warnings

    import numpy as np
    import torch
    from decolle.utils import tonp

    total_loss = np.zeros(loss_fn.num_losses)
    act_rate = [0 for _ in range(len(model))]
    loss_tv = torch.tensor(0.0)
    t_sample = x.shape[1]
    for k in range(0, t_sample):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            s, r, u = model.step(x[:, k, :, :])
            loss_ = loss_fn(s, r, u, target=target[:, k, :], mask=mask[:, k, :], sum_=False)
        with warnings.catch_warnings():  # their torch.tensor(list of graph tensors) warns
            warnings.simplefilter("ignore")
            total_loss += tonp(torch.tensor(loss_))
        loss_tv += sum(loss_)
        loss_tv.backward()
        optimizer.step()
        optimizer.zero_grad()
        for i in range(len(model)):
            act_rate[i] += tonp(s[i].mean().data) / t_sample
        loss_tv = torch.tensor(0.0)


def authors_infer_steps(model, loss_fn, x, target) -> None:
    """The body of decolle.utils.test for one batch (burnin 0), under ``torch.no_grad``."""
    import numpy as np
    import torch
    from decolle.base_model import sigmoid
    from decolle.utils import tonp

    steps, batch, n_classes = x.shape[1], x.shape[0], target.shape[2]
    test_loss = np.zeros([loss_fn.num_losses])
    r_cum = np.zeros((loss_fn.num_losses, steps, batch, n_classes))
    with torch.no_grad():
        for k in range(0, steps):
            s, r, u = model.step(x[:, k, :, :])
            test_loss_tv = loss_fn(s, r, u, target=target[:, k], sum_=False)
            test_loss += [tonp(v) for v in test_loss_tv]
            for l, n in enumerate(loss_fn.loss_layer):
                r_cum[l, k, :, :] += tonp(sigmoid(r[n]))


# --- FLOPs ----------------------------------------------------------------------------------


def layer_macs(net: PaperNet) -> list[dict]:
    """Multiply-accumulates per sample and time step, per layer: the synapse (conv at its
    full, pre-pool resolution; dense) and the fixed readout G (in_features x classes)."""
    c, h, w = net.input_shape
    rows = []
    for kind, ch, k, pool in net.layers:
        if kind == "conv":
            syn = h * w * ch * c * k * k  # "same" padding, stride 1
            h, w, c = h // pool, w // pool, ch
            n_out = c * h * w
        else:
            syn = c * h * w * ch
            c, h, w = ch, 1, 1
            n_out = ch
        rows.append({"synapse_macs": syn, "readout_macs": n_out * net.n_classes, "neurons": n_out})
    return rows


def flops_per_sample_step(net: PaperNet) -> dict:
    """FLOPs (2 per MAC) of one sample-time-step.

    ``infer``: synapses + readouts forward. ``train_decolle``: what DECOLLE needs: forward, the
    weight gradient of every synapse (as many MACs as its forward) and dL/dS = G^T e through each
    readout; no input gradient of any synapse, since no gradient crosses a layer.
    ``train_3x``: the usual backprop convention, forward + weight gradient + input gradient of
    every layer but the first (whose input gradient is never needed)."""
    rows = layer_macs(net)
    syn = sum(r["synapse_macs"] for r in rows)
    ro = sum(r["readout_macs"] for r in rows)
    fwd = 2 * (syn + ro)
    return {
        "infer": fwd,
        "train_decolle": fwd + 2 * syn + 2 * ro,
        "train_3x": 3 * fwd - 2 * rows[0]["synapse_macs"],
        "layers": rows,
    }


# --- the machine ------------------------------------------------------------------------------


def machine_info(threads: int | None = None) -> dict:
    import torch

    cpu = "unknown"
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1]
    except OSError:
        pass
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f" {f}" in f" {flags} "]
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    info = {
        "cpu_model": cpu,
        "cpu_simd": simd,
        "logical_cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_at_start": load,
        "time": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()
        info["memory_total_gb"] = round(int(mem[0].split()[1]) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    return info


# --- subprocess workers -------------------------------------------------------------------------


def run_worker(module: str, spec: dict, threads: int, timeout: float = 1800.0) -> dict:
    """Run ``python -m <module> --worker <json spec>`` in a fresh interpreter with
    OMP_NUM_THREADS = MKL_NUM_THREADS = ``threads``; returns its RESULT dict, or
    ``{"error": ...}`` if it failed, timed out or printed no result."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "src"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", module, "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}


def status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM, ...) in MB; None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def reset_peak_rss() -> float | None:
    """Give freed heap back to the OS and reset the peak RSS (VmHWM) to the current RSS (Linux
    >= 4.0), so that the peak read afterwards is that of what runs next alone; returns the RSS
    in MB (None where this cannot be done)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except (OSError, AttributeError):
        return None
    return status_mb("VmRSS")


def emit(result: dict) -> None:
    """Worker side: print the one result line the parent reads."""
    print(RESULT_TAG + json.dumps(result), flush=True)


def launch_command(processes: int, target: list[str]) -> list[str]:
    """``target`` (``-m module ...`` or a script and its arguments) on ``processes`` processes:
    torchrun with one node on 127.0.0.1 for 2 or more, a plain interpreter for 1."""
    if processes == 1:
        return [sys.executable, *target]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
            "--nproc-per-node", str(processes), "--rdzv-backend", "c10d",
            # port 0: the rendezvous store takes a free port itself (no race for one)
            "--rdzv-endpoint", "127.0.0.1:0", "--rdzv-id", uuid.uuid4().hex, *target]


ALLOCATORS = ("retain", "default")


def worker_setup(threads: int, allocator: str = "retain") -> None:
    """Threads and malloc policy of a measuring process, the same for every implementation:
    ``retain`` is what ``threefactor.run.from_config`` runs with (``allocator.retain_freed_memory``),
    ``default`` leaves glibc as it is."""
    import torch

    torch.set_num_threads(threads)
    if allocator == "retain":
        from threefactor.run.allocator import retain_freed_memory

        retain_freed_memory()
    elif allocator != "default":
        raise ValueError(f"unknown allocator {allocator!r}; valid: {', '.join(ALLOCATORS)}")


def summarise(values: list[float]) -> dict:
    """Median, min, max and relative spread ((max - min) / median) of repeated measurements."""
    v = sorted(x for x in values if x is not None and math.isfinite(x))
    if not v:
        return {"median": None, "min": None, "max": None, "spread": None, "n": 0, "values": []}
    n = len(v)
    med = v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])
    return {"median": med, "min": v[0], "max": v[-1],
            "spread": (v[-1] - v[0]) / med if med else None, "n": n, "values": values}


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
