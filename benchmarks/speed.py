"""Throughput of online DECOLLE training and of inference, against the authors' code and the
machine's practical peak.

    OMP_NUM_THREADS=2 ./dev run python -m benchmarks.speed [--threads 2] [--repeats 3]
        [--nets dvsgesture nmnist small] [--batches 1 8 32 72] [--target-s 3] [--out benchmarks/results]

For the paper's DvsGesture network (2x32x32, conv 7x7 64-128-128, pool 2-1-2, 11 classes) and
N-MNIST network (the same stack plus a 10-unit dense layer), and a small network, at every
batch size, on random events of 2 % density, it measures sample-time-steps per second of

- ``train``: ``rule.train_sequence`` of ``threefactor`` (one optimiser step per time step), and
  the training loop body of the authors' ``decolle.utils.train`` (PyPI ``decolle==0.2``, when
  installed: ``.venv/bin/pip install --no-deps decolle==0.2``) on their ``LenetDECOLLE``;
- ``infer``: ``predict_sequence`` (no autograd) against the body of ``decolle.utils.test``;

and the machine's practical peak: a 2048^3 matmul and a 7x7 128->128 conv on 16x16 maps
(batch 32, NCHW and channels-last, the better one), each in fp32 and in bf16, in their own
subprocesses at the start of every repeat, plus short bursts of both inside every worker just before its timed run. Each
throughput is turned into GFLOP/s with the FLOPs per sample-step counted analytically
(``_harness.flops_per_sample_step``) and reported as a fraction of the peak: best over best of
the run, and paired with the burst peak of its own worker. The machine these run on is shared:
medians show the typical run under the load of the moment, the best of the repeats what the
code does when it gets the cores, and per-CPU-second rates are less sensitive to load.
Every measurement runs in a fresh subprocess; the implementations alternate within each
repeat, so ratios are taken between neighbours in time. ``ours`` is the default closed-form
DECOLLE step, ``ours_autograd`` the same rule through autograd (``rule.closed_form: false``,
the before/after of the speed work; training only, inference has one path), and
``ours_compiled`` the closed form through ``torch.compile`` (``rule.compile: true``; its one-off
compile happens in the untimed warm-up), ``ours_bf16`` the default step with
``train.precision: bf16``, ``ours_bf16_compiled`` both (bf16 with ``rule.compile: true``),
and ``theirs_autocast`` the authors' step and loss under
``torch.autocast("cpu", torch.bfloat16)``. Every throughput is also given as a fraction of the
bf16 peak of the same run (``fraction_of_bf16_peak``). ``--allocator`` sets the malloc policy of every
measuring process, ours and theirs alike. Besides the
paper's two networks, ``small`` is the 3-layer network of the 1 kHz target (see
``_harness.NETWORKS``). Writes ``speed.json`` and ``speed.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _harness as H  # noqa: E402

MODULE = "benchmarks.speed"
OURS = ("ours", "ours_bf16", "ours_bf16_compiled", "ours_autograd", "ours_compiled")
THEIRS = ("theirs", "theirs_autocast")
IMPLS = OURS + THEIRS
PEAKS = ("peak_matmul", "peak_conv", "peak_matmul_bf16", "peak_conv_bf16")


# --- worker side ----------------------------------------------------------------------------


def _time_peak_matmul(n: int = 2048, min_s: float = 2.0, dtype: str = "fp32") -> dict:
    import torch

    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
    c = torch.empty(n, n, dtype=dt)
    for _ in range(2):
        torch.mm(a, b, out=c)
    reps, t0, c0 = 0, time.perf_counter(), time.process_time()
    while True:
        torch.mm(a, b, out=c)
        reps += 1
        el = time.perf_counter() - t0
        if el >= min_s and reps >= 3:
            break
    cpu = time.process_time() - c0
    return {"gflops": 2 * n**3 * reps / el / 1e9, "gflops_per_cpu_s": 2 * n**3 * reps / cpu / 1e9,
            "reps": reps, "elapsed_s": el, "cpu_s": cpu, "n": n, "dtype": dtype}


def _time_peak_conv(batch: int = 32, ch: int = 128, hw: int = 16, k: int = 7, min_s: float = 2.0,
                    dtype: str = "fp32") -> dict:
    """The 7x7 conv of the networks' widest layer, forward, in both memory layouts (oneDNN is
    faster in plain NCHW for wide convs on CPU); ``gflops`` is the better of the two."""
    import torch

    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    macs = batch * hw * hw * ch * ch * k * k
    out = {"shape": f"{batch}x{ch}x{hw}x{hw}, {k}x{k}, {ch} out", "dtype": dtype}
    for name, fmt in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
        conv = torch.nn.Conv2d(ch, ch, k, padding=k // 2).to(dtype=dt, memory_format=fmt)
        x = torch.randn(batch, ch, hw, hw, dtype=dt).contiguous(memory_format=fmt)
        with torch.no_grad():
            for _ in range(2):
                conv(x)
            reps, t0, c0 = 0, time.perf_counter(), time.process_time()
            while True:
                conv(x)
                reps += 1
                el = time.perf_counter() - t0
                if el >= min_s / 2 and reps >= 3:
                    break
            cpu = time.process_time() - c0
        out[name] = {"gflops": 2 * macs * reps / el / 1e9, "gflops_per_cpu_s": 2 * macs * reps / cpu / 1e9,
                     "reps": reps, "elapsed_s": el, "cpu_s": cpu}
    best = max(("nchw", "channels_last"), key=lambda n: out[n]["gflops"])
    out.update(gflops=out[best]["gflops"], gflops_per_cpu_s=out[best]["gflops_per_cpu_s"], layout=best)
    return out


def _burst_peak(reps: int = 6) -> float:
    """Best GFLOP/s of a few short bursts (1024^3 matmul; 7x7 conv 128->128 on 4x16x16,
    NCHW), measured in the worker just before its timed run: a peak under the same load."""
    import torch

    n = 1024
    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    conv = torch.nn.Conv2d(128, 128, 7, padding=3)
    x = torch.randn(4, 128, 16, 16)
    conv_flop = 2 * 4 * 16 * 16 * 128 * 128 * 49
    best = 0.0
    with torch.no_grad():
        torch.mm(a, b, out=c)
        conv(x)
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(a, b, out=c)
            best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
            t0 = time.perf_counter()
            conv(x)
            best = max(best, conv_flop / (time.perf_counter() - t0) / 1e9)
    return best


def _steps_for(per_step_s: float, target_s: float, lo: int = 5, hi: int = 2000) -> int:
    return int(min(hi, max(lo, round(target_s / max(per_step_s, 1e-6)))))


def _minor_faults() -> int:
    """Page faults of this process so far (minor: pages mapped in, e.g. zero-filled fresh ones)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _ours(spec: dict) -> dict:
    import torch

    from threefactor.rules import predict_sequence

    net = H.NETWORKS[spec["net"]]
    batch, mode = spec["batch"], spec["mode"]
    precision = "bf16" if spec["kind"] in ("ours_bf16", "ours_bf16_compiled") else "fp32"
    network, _, rule = H.build_ours(net, "decolle", closed_form=spec["kind"] != "ours_autograd",
                                    compile=spec["kind"] in ("ours_compiled", "ours_bf16_compiled"),
                                    precision=precision)
    labels = H.random_labels(batch, net.n_classes)
    if mode == "train":
        network.train()

        def run(x):
            rule.train_sequence(x, labels)
    else:
        network.eval()

        def run(x):
            predict_sequence(network, x, labels, 0, "smooth_l1", precision)

    warm = H.random_events(batch, 3, net.input_shape, seed=1)
    run(warm)  # first-use allocations and kernel selection
    t0 = time.perf_counter()
    run(warm)
    steps = _steps_for((time.perf_counter() - t0) / 3, spec["target_s"])
    x = H.random_events(batch, steps, net.input_shape, seed=2)
    peak_here = _burst_peak()
    f0, c0, t0 = _minor_faults(), time.process_time(), time.perf_counter()
    run(x)
    el, cpu, faults = time.perf_counter() - t0, time.process_time() - c0, _minor_faults() - f0
    return {"steps": steps, "elapsed_s": el, "cpu_s": cpu, "sample_steps_per_s": batch * steps / el,
            "peak_here_gflops": peak_here, "page_faults_per_step": faults / steps,
            "sample_steps_per_cpu_s": batch * steps / cpu, "torch_threads": torch.get_num_threads()}


def _theirs(spec: dict) -> dict:
    import torch

    net = H.NETWORKS[spec["net"]]
    batch, mode = spec["batch"], spec["mode"]
    model, optimizer, loss_fn = H.build_authors(net)
    labels = H.random_labels(batch, net.n_classes)
    autocast = spec["kind"] == "theirs_autocast"

    def run(x):
        target, mask = H.authors_targets(labels, x.shape[1], net.n_classes)
        if mode == "train":
            model.train()
            model.init(x, 0)  # their state reset (one step without gradient), not timed
            f0, c0, t0 = _minor_faults(), time.process_time(), time.perf_counter()
            H.authors_train_steps(model, optimizer, loss_fn, x, target, mask, autocast)
        else:
            model.eval()
            with torch.no_grad():
                model.init(x, 0)
            f0, c0, t0 = _minor_faults(), time.process_time(), time.perf_counter()
            H.authors_infer_steps(model, loss_fn, x, target)
        return time.perf_counter() - t0, time.process_time() - c0, _minor_faults() - f0

    warm = H.random_events(batch, 3, net.input_shape, seed=1)
    run(warm)
    steps = _steps_for(run(warm)[0] / 3, spec["target_s"])
    x = H.random_events(batch, steps, net.input_shape, seed=2)
    peak_here = _burst_peak()
    el, cpu, faults = run(x)
    return {"steps": steps, "elapsed_s": el, "cpu_s": cpu, "sample_steps_per_s": batch * steps / el,
            "peak_here_gflops": peak_here, "page_faults_per_step": faults / steps,
            "sample_steps_per_cpu_s": batch * steps / cpu, "torch_threads": torch.get_num_threads()}


def worker(spec: dict) -> dict:
    H.worker_setup(spec["threads"], spec.get("allocator", "retain"))
    kind = spec["kind"]
    if kind in ("peak_matmul", "peak_matmul_bf16"):
        return _time_peak_matmul(dtype="bf16" if kind.endswith("bf16") else "fp32")
    if kind in ("peak_conv", "peak_conv_bf16"):
        return _time_peak_conv(dtype="bf16" if kind.endswith("bf16") else "fp32")
    if kind in OURS:
        return _ours(spec)
    if kind in THEIRS:
        ok, why = H.authors_available()
        if not ok:
            return {"error": why}
        return _theirs(spec)
    raise ValueError(f"unknown worker kind {kind!r}")


# --- parent side ----------------------------------------------------------------------------


def measure(args) -> dict:
    theirs_ok, theirs_version = H.authors_available()
    if not set(THEIRS) & set(args.impls):
        theirs_ok, theirs_version = False, "not measured (--impls without theirs)"
    elif not theirs_ok:
        print(f"note: skipping the authors' column: {theirs_version}", file=sys.stderr)
    raw: dict[str, list] = {k: [] for k in PEAKS}
    cells = [(n, m, b) for n in args.nets for m in args.modes for b in args.batches]

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t_all = time.perf_counter()
    for rep in range(args.repeats):
        for kind in PEAKS:
            r = H.run_worker(MODULE, {"kind": kind, "threads": args.threads,
                                      "allocator": args.allocator}, args.threads)
            raw[kind].append(r)
            log(f"[rep {rep + 1}] {kind}: {r.get('gflops', r.get('error'))}")
        for net, mode, batch in cells:
            for impl in args.impls:
                training_only = ("ours_autograd", "ours_compiled", "ours_bf16_compiled", "theirs_autocast")
                if (impl in THEIRS and not theirs_ok) or (impl in training_only and mode == "infer"):
                    continue  # inference has one path: predict_sequence, no autograd
                spec = {"kind": impl, "net": net, "mode": mode, "batch": batch,
                        "target_s": args.target_s, "threads": args.threads,
                        "allocator": args.allocator}
                r = H.run_worker(MODULE, spec, args.threads, timeout=args.timeout)
                raw.setdefault(f"{impl}/{net}/{mode}/{batch}", []).append(r)
                log(f"[rep {rep + 1}] {impl:15s} {net:10s} {mode:5s} B={batch:3d}: "
                    f"{r.get('sample_steps_per_s', r.get('error'))}")
    wall = time.perf_counter() - t_all
    data = {
        "benchmark": "speed",
        "command": " ".join(["python -m benchmarks.speed", *sys.argv[1:]]),
        "machine": H.machine_info(args.threads),
        "load_average_at_end": list(__import__("os").getloadavg()),
        "settings": {"threads": args.threads, "repeats": args.repeats, "target_s": args.target_s,
                     "allocator": args.allocator,
                     "nets": args.nets, "modes": args.modes, "batches": args.batches,
                     "theirs_ok": theirs_ok,
                     "input": "random events, 2 % of pixels x polarities on per step",
                     "ours": "threefactor DecolleRule.train_sequence / predict_sequence; fast_sigmoid, "
                             "lagged P, dropout 0.5, smooth L1, Adamax betas (0, 0.95), burn-in 0",
                     "theirs": f"decolle=={theirs_version}: LenetDECOLLE + loop bodies of decolle.utils."
                               "train (online_update) / test" if theirs_ok else theirs_version,
                     "ours_bf16": "ours with train.precision bf16 (bf16 synapse products, fp32 master "
                                  "weights, optimiser state, traces and losses)",
                     "ours_bf16_compiled": "ours_bf16 with rule.compile true",
                     "theirs_autocast": "theirs with their step and loss under torch.autocast(cpu, bfloat16)"},
        "flops": {n: H.flops_per_sample_step(H.NETWORKS[n]) for n in args.nets},
        "raw": raw,
        "wall_s": wall,
    }
    return aggregate(data)


def aggregate(data: dict) -> dict:
    """Summaries of ``data["raw"]`` (also run by --reaggregate on an existing JSON)."""
    raw, st = data["raw"], data["settings"]
    theirs_ok = st["theirs_ok"]
    cells = [(n, m, b) for n in st["nets"] for m in st["modes"] for b in st["batches"]]

    def vals(key: str, field: str = "sample_steps_per_s") -> list[float]:
        return [r[field] for r in raw.get(key, []) if field in r]

    # The machine is shared: the median shows the typical run under the load of the moment, the
    # best (max) of the repeats what the code does when it gets the cores. Fractions of peak are
    # best over best (both measured in this run) and, less sensitive to load, per CPU-second.
    peak = {k: H.summarise(vals(k, "gflops")) for k in PEAKS}
    peak_ref = max((peak[k]["max"] or 0.0) for k in ("peak_matmul", "peak_conv"))
    # bf16 peak: of the bf16 kernels; every implementation (fp32 ones too) against it
    peak_bf16_ref = max((peak[k]["max"] or 0.0) for k in ("peak_matmul_bf16", "peak_conv_bf16"))
    peak_cpu = {k: H.summarise(vals(k, "gflops_per_cpu_s")) for k in ("peak_matmul", "peak_conv")}
    peak_cpu_ref = max((p["max"] or 0.0) for p in peak_cpu.values())
    rows = []
    for net, mode, batch in cells:
        flops = H.flops_per_sample_step(H.NETWORKS[net])
        f_step = flops["infer"] if mode == "infer" else flops["train_decolle"]
        key_o, key_t = f"ours/{net}/{mode}/{batch}", f"theirs/{net}/{mode}/{batch}"
        ours, theirs = vals(key_o), vals(key_t)
        ours_c, theirs_c = vals(key_o, "sample_steps_per_cpu_s"), vals(key_t, "sample_steps_per_cpu_s")
        s_ours, s_ours_c = H.summarise(ours), H.summarise(ours_c)
        s_theirs = H.summarise(theirs) if theirs_ok and theirs else None
        paired = theirs_ok and theirs and len(ours) == len(theirs)
        row = {
            "net": net, "mode": mode, "batch": batch,
            "flops_per_sample_step": f_step,
            "ours_sample_steps_per_s": s_ours,
            "theirs_sample_steps_per_s": s_theirs,
            "ratio_ours_over_theirs": H.summarise([o / t for o, t in zip(ours, theirs)]) if paired else None,
            "ours_sample_steps_per_cpu_s": s_ours_c,
            "theirs_sample_steps_per_cpu_s": H.summarise(theirs_c) if theirs_ok and theirs_c else None,
            "ratio_ours_over_theirs_cpu_time": (H.summarise([o / t for o, t in zip(ours_c, theirs_c)])
                                                if paired and len(ours_c) == len(theirs_c) else None),
            "ours_best_gflops": (s_ours["max"] or 0) * f_step / 1e9,
            "ours_fraction_of_peak": ((s_ours["max"] or 0) * f_step / 1e9 / peak_ref) if peak_ref else None,
            "ours_fraction_of_peak_cpu_time": ((s_ours_c["median"] or 0) * f_step / 1e9 / peak_cpu_ref
                                               if peak_cpu_ref else None),
            "errors": [r["error"] for k in (key_o, key_t) for r in raw.get(k, []) if "error" in r],
            "ours_page_faults_per_step": H.summarise(vals(key_o, "page_faults_per_step")),
            "theirs_page_faults_per_step": H.summarise(vals(key_t, "page_faults_per_step")),
        }
        # each run against the burst peak measured in the same process just before it
        here = [r["sample_steps_per_s"] * f_step / 1e9 / r["peak_here_gflops"]
                for r in raw.get(key_o, []) if r.get("peak_here_gflops")]
        row["ours_fraction_of_peak_paired"] = H.summarise(here) if here else None
        # the other paths of ours: each against theirs, and the default against it (or it
        # against the default), paired repeat by repeat
        for impl, short, speedup in (("ours_autograd", "autograd", "speedup_closed_form_over_autograd"),
                                     ("ours_compiled", "compiled", "speedup_compiled_over_eager"),
                                     ("ours_bf16", "bf16", "speedup_bf16_over_fp32"),
                                     ("ours_bf16_compiled", "bf16_compiled", "speedup_bf16_compiled_over_fp32"),
                                     ("theirs_autocast", "theirs_autocast", None)):
            key = f"{impl}/{net}/{mode}/{batch}"
            if not raw.get(key):
                continue
            v = vals(key)
            row[f"{impl}_sample_steps_per_s"] = H.summarise(v)
            row[f"{impl}_sample_steps_per_cpu_s"] = H.summarise(vals(key, "sample_steps_per_cpu_s"))
            row["errors"] += [r["error"] for r in raw[key] if "error" in r]
            if speedup and len(v) == len(ours):
                pairs = zip(ours, v) if impl == "ours_autograd" else zip(v, ours)
                row[speedup] = H.summarise([a / b for a, b in pairs])
            if theirs_ok and v and len(v) == len(theirs):
                row[f"ratio_{short}_over_theirs"] = H.summarise([a / t for a, t in zip(v, theirs)])
        autocast = vals(f"theirs_autocast/{net}/{mode}/{batch}")
        for impl, short in (("ours_bf16", "bf16"), ("ours_bf16_compiled", "bf16_compiled")):
            v = vals(f"{impl}/{net}/{mode}/{batch}")
            if v and len(v) == len(autocast):
                row[f"ratio_{short}_over_theirs_autocast"] = H.summarise([a / t for a, t in zip(v, autocast)])
        # every implementation's best as a fraction of the bf16 peak of the same run
        row["fraction_of_bf16_peak"] = {
            impl: (max(v) * f_step / 1e9 / peak_bf16_ref)
            for impl in IMPLS if peak_bf16_ref and (v := vals(f"{impl}/{net}/{mode}/{batch}"))}
        if mode == "train":
            row["ours_fraction_of_peak_3x_convention"] = (
                (s_ours["max"] or 0) * flops["train_3x"] / 1e9 / peak_ref if peak_ref else None)
        if s_theirs:
            row["theirs_fraction_of_peak"] = (s_theirs["max"] or 0) * f_step / 1e9 / peak_ref if peak_ref else None
        rows.append(row)
    data.update({
        "peak_gflops": peak,
        "peak_reference_gflops": peak_ref,
        "peak_reference_bf16_gflops": peak_bf16_ref,
        "peak_gflops_per_cpu_s": peak_cpu,
        "peak_reference_gflops_per_cpu_s": peak_cpu_ref,
        "results": rows,
    })
    return data


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["results"]
    nets = sorted({r["net"] for r in rows})
    modes = [m for m in ("train", "infer") if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(len(modes), len(nets), figsize=(5.5 * len(nets), 4 * len(modes)),
                             squeeze=False)
    for i, mode in enumerate(modes):
        for j, net in enumerate(nets):
            ax = axes[i][j]
            sel = sorted((r for r in rows if r["net"] == net and r["mode"] == mode), key=lambda r: r["batch"])
            xs = [r["batch"] for r in sel]
            for key, label, color in (("ours_sample_steps_per_s", "threefactor", "C0"),
                                      ("ours_autograd_sample_steps_per_s", "threefactor, autograd path", "C2"),
                                      ("ours_compiled_sample_steps_per_s", "threefactor, rule.compile", "C3"),
                                      ("ours_bf16_sample_steps_per_s", "threefactor, bf16", "C4"),
                                      ("ours_bf16_compiled_sample_steps_per_s", "threefactor, bf16 + rule.compile",
                                       "C6"),
                                      ("theirs_sample_steps_per_s", "decolle==0.2 (authors)", "C1"),
                                      ("theirs_autocast_sample_steps_per_s", "decolle==0.2 under bf16 autocast",
                                       "C5")):
                s = [r[key] for r in sel if r.get(key) and r[key]["median"]]
                if len(s) != len(sel) or not s:
                    continue
                med = [v["median"] for v in s]
                err = [[m - v["min"] for m, v in zip(med, s)], [v["max"] - m for m, v in zip(med, s)]]
                ax.errorbar(xs, med, yerr=err, marker="o", capsize=3, label=label, color=color)
            for r in sel:
                if r.get("ours_fraction_of_peak"):
                    ax.annotate(f"{100 * r['ours_fraction_of_peak']:.0f}%", (r["batch"], r["ours_sample_steps_per_s"]["max"]),
                                textcoords="offset points", xytext=(4, -12), fontsize=7, color="C0")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.set_xlabel("batch size")
            ax.set_ylabel("sample-time-steps / s")
            ax.set_title(f"{net}, {mode}")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
    m = data["machine"]
    fig.suptitle(f"{m['cpu_model']}, {m['threads']} threads, torch {m['torch']}, shared machine; median, bars: "
                 f"min-max of repeats; best peak {data['peak_reference_gflops']:.0f} GFLOP/s (% = best/best peak)",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(data: dict) -> str:
    """One line per (net, mode, batch, implementation): sample-steps/s median (best), the paired
    ratio against the authors' code as shipped, and the best as a percentage of the peaks."""
    lines = ["sample-steps/s: median (best) of the repeats; x theirs: median of paired runs; "
             "%peak: best over the best fp32 / bf16 peak of the run",
             "net         mode  batch  impl              steps/s median (best)  x theirs  %peak32 %peak16"]
    peak32, peak16 = data["peak_reference_gflops"], data.get("peak_reference_bf16_gflops")
    ratio_key = {"ours": "ratio_ours_over_theirs", "ours_autograd": "ratio_autograd_over_theirs",
                 "ours_compiled": "ratio_compiled_over_theirs", "ours_bf16": "ratio_bf16_over_theirs",
                 "ours_bf16_compiled": "ratio_bf16_compiled_over_theirs",
                 "theirs_autocast": "ratio_theirs_autocast_over_theirs"}
    for r in data["results"]:
        for impl in IMPLS:
            s = r.get(f"{impl}_sample_steps_per_s")
            if not s or not s["median"]:
                continue
            q = r.get(ratio_key.get(impl, ""))
            ratio = f"{q['median']:6.2f}x" if q and q["median"] else ("    1x " if impl == "theirs" else "   n/a ")
            gflops = s["max"] * r["flops_per_sample_step"] / 1e9
            p32 = f"{100 * gflops / peak32:6.1f}" if peak32 else "   n/a"
            p16 = f"{100 * gflops / peak16:6.1f}" if peak16 else "   n/a"
            lines.append(f"{r['net']:11s} {r['mode']:5s} {r['batch']:5d}  {impl:16s} {s['median']:9.1f} "
                         f"({s['max']:9.1f})  {ratio}   {p32}  {p16}")
        for short in ("bf16", "bf16_compiled"):
            q = r.get(f"ratio_{short}_over_theirs_autocast")
            if q and q["median"]:
                lines.append(f"{'':30s}ours_{short} / theirs_autocast (paired median): {q['median']:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of every measurement (2)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--nets", nargs="+", default=["dvsgesture", "nmnist", "small"], choices=sorted(H.NETWORKS))
    p.add_argument("--modes", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32, 72])
    p.add_argument("--impls", nargs="+", default=["ours", "ours_bf16", "ours_autograd", "ours_compiled", "theirs"],
                   choices=list(IMPLS),
                   help="ours (threefactor, closed-form DECOLLE step in fp32: the default), ours_bf16 "
                        "(the same with train.precision bf16), ours_bf16_compiled (bf16 and rule.compile=true), "
                        "ours_autograd (through autograd, "
                        "rule.closed_form=false), ours_compiled (the closed form with rule.compile=true), "
                        "theirs (decolle==0.2 as shipped), theirs_autocast (theirs under "
                        "torch.autocast(cpu, bfloat16))")
    p.add_argument("--allocator", default="retain", choices=H.ALLOCATORS,
                   help="malloc policy of every measuring process, ours and theirs alike: retain "
                        "(as threefactor.run.from_config runs, allocator.retain_freed_memory) or default "
                        "(glibc as it is) (retain)")
    p.add_argument("--target-s", type=float, default=3.0, help="seconds per timed sequence (3)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per measurement (600)")
    p.add_argument("--out", type=Path, default=H.ROOT / "benchmarks" / "results")
    p.add_argument("--reaggregate", type=Path, help="recompute the summaries of an existing JSON, no measuring")
    p.add_argument("--name", default="speed", help="file stem of the JSON and PNG (speed)")
    args = p.parse_args(argv)
    if args.worker:
        try:
            H.emit(worker(json.loads(args.worker)))
        except Exception as err:  # noqa: BLE001 - reported to the parent as this cell's error
            H.emit({"error": f"{type(err).__name__}: {err}"})
        return None
    if args.reaggregate:
        data = aggregate(json.loads(args.reaggregate.read_text()))
        args.name = args.reaggregate.stem
        args.out = args.reaggregate.parent
    else:
        data = measure(args)
    H.write_json(args.out / f"{args.name}.json", data)
    try:
        plot(data, args.out / f"{args.name}.png")
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
    print(table(data))
    pk = data["peak_gflops"]
    def fmt(k: str) -> str:
        p = pk.get(k)
        return f"{p['median']:.1f} / {p['max']:.1f}" if p and p["median"] else "n/a"

    print(f"peak GFLOP/s (median / best): fp32 matmul {fmt('peak_matmul')}, conv {fmt('peak_conv')}; "
          f"bf16 matmul {fmt('peak_matmul_bf16')}, conv {fmt('peak_conv_bf16')}; "
          f"wrote {args.out / args.name}.json/.png")
    return data


if __name__ == "__main__":
    main()
