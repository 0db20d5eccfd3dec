"""Typed settings, loaded from YAML and validated: a typo is one sentence, not a traceback.

The dataclass defaults are the default run (`threefactor train` with no arguments): a small
convolutional DECOLLE network on the embedded motion dataset.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from .errors import ConfigError

# YAML 1.1 (PyYAML) reads 1e-3 as a string; accept it where a number is expected.
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@dataclass
class LayerConfig:
    type: Literal["conv", "dense"] = "conv"
    channels: int = 16  # output channels (conv) or units (dense)
    kernel: int = 5
    pool: int = 1
    padding: int | None = None  # None: "same" padding, kernel // 2
    recurrent: bool = False  # LIF dense layers only: add a recurrent synapse V s[t-1]


@dataclass
class NeuronConfig:
    # Faster than the authors' N-MNIST decays (0.97, 0.92): the embedded dataset's motion cue is
    # the direction of each dot's trace "comet", which these keep within a 5 x 5 kernel.
    alpha: float = 0.8
    beta: float = 0.6
    gamma: float = 0.65
    rho: float = 1.0
    # current: input spikes reach U in the same step (exact NIR CubaLIF); lagged: one step
    # later, P driven by the previous Q (the authors' code)
    ordering: Literal["current", "lagged"] = "current"
    # pooled layers: before_pool keeps one R per unpooled neuron, driven by its own spikes
    # (the authors' code); after_pool one R per pooled unit (docs/decolle.md compares them)
    refractory: Literal["after_pool", "before_pool"] = "before_pool"
    spike_at_zero: bool = False  # U = 0 is a spike (false: spike on U > 0, the authors' code)


@dataclass
class LIFConfig:
    """The LIF neuron of S-TLLR: u = gamma (u - v_th s) + I (soft reset), s = Theta(u - v_th)."""

    gamma: float = 0.9  # leak per step
    v_th: float = 1.0  # firing threshold
    reset: Literal["soft", "hard"] = "soft"  # soft: u - v_th after a spike; hard: u * 0


@dataclass
class NetworkConfig:
    layers: list[LayerConfig] = field(
        default_factory=lambda: [
            LayerConfig("conv", 16, 5, 2),
            LayerConfig("conv", 32, 5, 2),
            LayerConfig("conv", 32, 3, 1),
        ]
    )
    neuron: NeuronConfig = field(default_factory=NeuronConfig)
    surrogate: Literal["boxcar", "fast_sigmoid", "sigmoid"] = "boxcar"
    readout_scale: float = 0.5
    readout_bias: bool = False  # a fixed random bias on every readout, drawn like G (the authors' code)
    feedback_alignment: bool = False
    dropout: float = 0.2  # on the path into each readout only
    init: Literal["lsuv", "default"] = "lsuv"
    init_target_mean: float = 0.0  # LSUV: shift biases until mean U is within 0.2 of this
    neuron_model: Literal["decolle", "lif"] = "decolle"  # lif: soft-reset LIF (needed by rule stllr)
    lif: LIFConfig = field(default_factory=LIFConfig)  # used when neuron_model is lif


@dataclass
class DataConfig:
    dataset: Literal["embedded", "nmnist", "simulated_nmnist", "dvsgesture", "shd", "folder"] = "embedded"
    root: str | None = None  # folder of the recordings (all but embedded); MNIST IDX for simulated_nmnist
    download: bool = False  # fetch the official archives into root when missing
    n_train: int = 800  # at most this many samples (a seeded random subset of a larger set)
    n_test: int = 240
    timesteps: int = 60  # bins of dt_us per training sample
    test_timesteps: int | None = None  # bins per test sample; null = timesteps
    dt_us: int = 1000
    random_slice: bool = False  # training samples: a random window of timesteps bins, not the first
    downsample: int = 1  # sum events of factor x factor pixels (DVS Gesture: 4, 128 -> 32)
    crop: int | None = None  # centre crop to crop x crop pixels (N-MNIST: 32, from 34)
    # folder: the sensor [width, height, polarities] every event is checked against; null = the
    # smallest that holds the training split's events (the other datasets' sensors are fixed)
    sensor_size: tuple[int, int, int] | None = None
    # folder: the class names, in the order of their indices; null = the training split's, sorted
    classes: list[str] | None = None
    # an event off the sensor: error refuses its file; drop leaves the event out (and says how many)
    outside_sensor: Literal["error", "drop"] = "error"
    cache_dir: str | None = "~/.cache/threefactor"  # frames of splits too large for memory
    seed: int = 1234
    # The embedded dataset's recordings:
    speed: float = 0.6  # pixels per ms at the typical radius
    contrast: float = 1.0  # peak log-intensity change of a dot (bright or dark)
    dots_per_view: float = 8.0  # mean number of dots in the 32 x 32 view
    threshold: float = 0.2  # pixel contrast threshold (log intensity)
    noise_rate_hz: float = 2.0  # background events per pixel per second


@dataclass
class ErrorTriggerConfig:
    """Error-triggered DECOLLE (Payvand et al. 2020); off while threshold and target_rate are null."""

    threshold: float | None = None  # |dL/dS| must exceed this to send an error event; 0 = plain DECOLLE
    target_rate: float | None = None  # adapt the threshold towards this fraction of error events
    adapt: float = 0.1  # log-threshold step per time step, times the relative rate error (clipped to 1)
    mode: Literal["gate", "ternary"] = "gate"  # gate: send the error itself; ternary: threshold * sign


@dataclass
class STLLRConfig:
    # [lambda_post, lambda_pre, alpha_post, alpha_pre]: [0.2, 0.75, -1, 1] vision, [0.5, 1, 1, 1] SHD
    factors: tuple[float, float, float, float] = (0.2, 0.75, -1.0, 1.0)
    # Psi, the secondary activation (also the spike's derivative for the learning signal):
    # authors = the authors' function for each layer's kind (authors_linear on dense layers,
    # authors_conv on conv layers); null = network.surrogate
    psi: Literal["authors", "authors_linear", "authors_conv", "boxcar", "fast_sigmoid", "sigmoid"] | None = None
    # psi_delta: db = sum Psi delta (the authors'); synapse: the bias as a synapse from a constant 1
    # (the defaults psi null + synapse measured better than the authors' choices on the embedded
    # dataset: docs/rules.md; the stllr-* presets use the authors')
    bias_update: Literal["psi_delta", "synapse"] = "synapse"
    learning_signal: Literal["backprop", "dfa", "local"] = "backprop"  # how delta reaches hidden layers
    update: Literal["step", "sequence"] = "step"  # optimiser step every time step, or once per sequence


@dataclass
class RuleConfig:
    name: Literal["decolle", "stllr", "bptt"] = "decolle"
    # smooth_l1, mse, cross_entropy, or the dotted import path of a user cost
    # cost(readout, target, layer_index) -> scalar ("mypackage.costs:hinge")
    loss: str = "smooth_l1"
    reg1: float = 0.0  # lambda1 <[U + 0.01]+>: keeps U below threshold on average
    reg2: float = 0.0  # lambda2 [0.1 - <U>]+: keeps each layer from going silent
    burn_in: int = 10  # steps without updates at the start of every sequence
    loss_layers: Literal["all", "last"] = "all"  # stllr, bptt: which layers' readouts form the loss
    bptt_window: int | None = None  # bptt: truncated, one update per this many steps; null: per sequence
    error_trigger: ErrorTriggerConfig = field(default_factory=ErrorTriggerConfig)  # decolle only
    # decolle: gradients in closed form (Eq. 7) without autograd where the network allows it
    # (same updates, faster); false forces the autograd path
    closed_form: bool = True
    # decolle closed form: torch.compile the per-step math (fuses its elementwise work; pays
    # for small networks and batches, where per-operation overhead dominates; ~20 s to compile)
    compile: bool = False
    stllr: STLLRConfig = field(default_factory=STLLRConfig)


@dataclass
class OptimConfig:
    name: Literal["adamax", "adam", "sgd"] = "adamax"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.0, 0.95)
    layer_lr_scale: list[float] | None = None  # one multiplier per layer
    lr_decay_every: int = 3  # epochs; 0 = constant
    lr_decay_factor: float = 3.0  # lr is divided by this every lr_decay_every epochs


def _tensorboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


@dataclass
class TrainConfig:
    epochs: int = 8
    batch_size: int = 32
    eval_batch_size: int = 128
    progress: bool = True
    checkpoint_every: int = 0  # batches between checkpoints; 0 = at the end of every epoch only
    eval_every: int = 0  # batches between extra test evaluations; 0 = at the end of every epoch only
    tensorboard: bool = field(default_factory=_tensorboard_available)  # event files in RUN_DIR/tensorboard
    plots: bool = True  # PNGs in RUN_DIR/plots at the end of training (needs matplotlib)
    # The run is stopped as diverged when a layer's loss or weight norm exceeds this many times
    # its running value (besides any NaN or Inf); 0 = stop on NaN and Inf only
    divergence_factor: float = 1000.0
    # The synapses' products (conv, dense; forward and weight gradient) in fp32 or in bf16 with
    # fp32 weights, gradients, optimiser state, traces and losses; auto: bf16 where the device
    # computes it natively (AVX512-BF16/AMX CPU, CUDA capability >= 8.0), else fp32
    precision: Literal["fp32", "bf16", "auto"] = "fp32"


@dataclass
class DistributedConfig:
    """Training on several processes under torchrun (ignored in a single process)."""

    # exact: gradients averaged over the processes before every optimiser step (as one process
    # on the combined batch); periodic: each process steps on its own shard and the weights are
    # averaged every average_every optimiser steps (less traffic, not the same trajectory).
    sync: Literal["exact", "periodic"] = "exact"
    average_every: int = 50  # periodic: optimiser steps between weight averages


@dataclass
class StreamConfig:
    """``threefactor stream``: online learning on an unbounded event stream (docs/stream.md)."""

    # motion: the embedded generator without end; dataset: the recordings of data.* back to back;
    # aedat4: the file stream.path; camera: a live camera (both through dv-processing)
    source: Literal["motion", "dataset", "aedat4", "camera"] = "motion"
    steps: int | None = 100_000  # 1 ms steps in all; null: until the source ends
    window_steps: int = 1000  # steps per metrics row (running accuracy per window)
    checkpoint_every_steps: int = 50_000
    checkpoint_every_s: float = 600.0
    learn: bool = True  # false: inference only
    learn_until_segment: int | None = None  # learning stops at this segment (a frozen network)
    min_ms: int = 60  # motion: segment lengths, drawn per segment
    max_ms: int = 200
    downsample: int = 2  # motion, aedat4, camera: frames summed over blocks (32 x 32 -> 16 x 16)
    # what changes in a motion stream: class_incremental (two new classes every phase_segments
    # segments), domain_shift (from shift_at_segment on, `shift`), sparse_labels (only
    # label_fraction of the segments carry their label)
    scenario: Literal["none", "class_incremental", "domain_shift", "sparse_labels"] = "none"
    phase_segments: int = 200
    shift: Literal["speed", "polarity"] = "speed"
    shift_at_segment: int = 300
    label_fraction: float = 0.1
    passes: int | None = None  # dataset: passes over the recordings; null: forever
    path: str | None = None  # aedat4: the file
    labels: str | None = None  # aedat4, camera: a start_us,end_us,class listing
    segment_ms: int = 100  # aedat4, camera: longest segment (cut earlier where the label changes)
    plot_every: int = 10  # windows between redraws of RUN_DIR/plots/stream.png
    # motion: this many independent streams learning side by side as one batch (each with its own
    # state; segments of one length, min_ms = max_ms)
    parallel: int = 1


@dataclass
class Config:
    seed: int = 0
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    rule: RuleConfig = field(default_factory=RuleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)


# --- loading and validation ------------------------------------------------------------

PRESET_DIR = Path(__file__).parent / "configs"


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"a list ({_type_name(typing.get_args(tp)[0])})"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            type(None): "null"}.get(tp, str(tp))


# What a message quotes of an offending value: a few items, a few levels, a short prefix. A
# value built from nested YAML anchors can be astronomically large once written out.
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxtuple = 2, 4, 4, 4
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 60, 60, 40
MAX_QUOTE = 80
MAX_CONFIG_BYTES = 2**20


def quote(value: Any) -> str:
    """A short repr of ``value`` for an error message (at most ``MAX_QUOTE`` characters)."""
    return _clip(_SHORT.repr(value))


def _clip(text: str) -> str:
    """``text`` (a key, a --set assignment) cut to at most ``MAX_QUOTE`` characters."""
    return text if len(text) <= MAX_QUOTE else text[:MAX_QUOTE - 3] + "..."


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    def bad() -> ConfigError:
        return ConfigError(
            f"{source}: '{key}' must be {_type_name(tp)}, got {quote(value)}"
        )

    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad()
        return _build(tp, value, key, source)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad()
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _convert(value, option, key, source)
            except ConfigError:
                continue
        raise bad()
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad()
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{key}.{i}", source) for i, v in enumerate(value)]
    if origin is tuple:
        items = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise ConfigError(f"{source}: '{key}' must be a list of {len(items)} numbers, got {quote(value)}")
        return tuple(_convert(v, t, f"{key}.{i}", source) for i, (v, t) in enumerate(zip(value, items)))
    if tp is type(None):
        if value is not None:
            raise bad()
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        if not math.isfinite(value):
            raise ConfigError(f"{source}: '{key}' must be a finite number, got {value}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    raise TypeError(f"unsupported config type {tp}")  # a schema bug, not a user error


def _build(cls: type, data: dict, prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key)[:MAX_QUOTE], names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            where = f"'{prefix}'" if prefix else "the top level"
            raise ConfigError(
                f"{source}: unknown key '{_clip(full)}'{hint}; valid keys in {where}: {', '.join(names)}"
            )
        kwargs[key] = _convert(value, hints[key], full, source)
    return cls(**kwargs)


def config_from_dict(data: dict, source: str = "config") -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a config must be a mapping of keys to values")
    cfg = _build(Config, data, "", source)
    check(cfg, source)
    return cfg


def check(cfg: Config, source: str = "config") -> None:
    """Value constraints that types alone do not express."""
    if cfg.data.dataset != "embedded" and cfg.data.root is None:
        raise ConfigError(f"{source}: data.dataset '{cfg.data.dataset}' needs 'data.root', the folder of its files")
    positive = {
        "data.n_train": cfg.data.n_train, "data.n_test": cfg.data.n_test,
        "data.dt_us": cfg.data.dt_us, "data.downsample": cfg.data.downsample,
        "data.timesteps": cfg.data.timesteps, "train.batch_size": cfg.train.batch_size,
        "train.eval_batch_size": cfg.train.eval_batch_size, "optim.lr": cfg.optim.lr,
        "data.threshold": cfg.data.threshold,
    }
    for key, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{source}: '{key}' must be > 0, got {value}")
    for key, value in (("network.neuron.alpha", cfg.network.neuron.alpha),
                       ("network.neuron.beta", cfg.network.neuron.beta),
                       ("network.neuron.gamma", cfg.network.neuron.gamma)):
        if not 0 <= value < 1:
            raise ConfigError(f"{source}: '{key}' is a decay per step and must be in [0, 1), got {value}")
    if not 0 <= cfg.network.dropout < 1:
        raise ConfigError(f"{source}: 'network.dropout' must be in [0, 1), got {cfg.network.dropout}")
    if not 0 <= cfg.rule.burn_in < cfg.data.timesteps:
        raise ConfigError(
            f"{source}: 'rule.burn_in' ({cfg.rule.burn_in}) must be in [0, data.timesteps = "
            f"{cfg.data.timesteps})"
        )
    if cfg.train.epochs < 0:
        raise ConfigError(f"{source}: 'train.epochs' must be >= 0, got {cfg.train.epochs}")
    for key in ("checkpoint_every", "eval_every"):
        if getattr(cfg.train, key) < 0:
            raise ConfigError(f"{source}: 'train.{key}' must be >= 0 (0 = end of epoch only), got {getattr(cfg.train, key)}")
    if not cfg.network.layers:
        raise ConfigError(f"{source}: 'network.layers' must list at least one layer")
    for i, layer in enumerate(cfg.network.layers):
        if layer.channels < 1 or layer.kernel < 1 or layer.pool < 1:
            raise ConfigError(f"{source}: 'network.layers.{i}' needs channels, kernel and pool >= 1")
    o = cfg.optim
    if not o.lr_decay_factor > 0:
        raise ConfigError(f"{source}: 'optim.lr_decay_factor' must be > 0, got {o.lr_decay_factor}")
    if o.lr_decay_every < 0:
        raise ConfigError(f"{source}: 'optim.lr_decay_every' must be >= 0, got {o.lr_decay_every}")
    if not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"{source}: 'optim.betas' must both be in [0, 1), got {list(o.betas)}")
    if o.layer_lr_scale is not None and not all(s > 0 for s in o.layer_lr_scale):
        raise ConfigError(f"{source}: 'optim.layer_lr_scale' entries must be > 0, got {quote(o.layer_lr_scale)}")
    if cfg.data.noise_rate_hz < 0:
        raise ConfigError(f"{source}: 'data.noise_rate_hz' must be >= 0, got {cfg.data.noise_rate_hz}")
    for i, layer in enumerate(cfg.network.layers):
        if layer.padding is not None and layer.padding < 0:
            raise ConfigError(f"{source}: 'network.layers.{i}.padding' must be >= 0 or null, got {layer.padding}")
    scales = cfg.optim.layer_lr_scale
    if scales is not None and len(scales) != len(cfg.network.layers):
        raise ConfigError(
            f"{source}: 'optim.layer_lr_scale' has {len(scales)} entries for "
            f"{len(cfg.network.layers)} layers"
        )
    if cfg.distributed.average_every < 1:
        raise ConfigError(
            f"{source}: 'distributed.average_every' must be >= 1 (optimiser steps between weight "
            f"averages), got {cfg.distributed.average_every}"
        )
    if cfg.train.divergence_factor != 0 and not cfg.train.divergence_factor > 1:
        raise ConfigError(
            f"{source}: 'train.divergence_factor' must be > 1 (how many times its running value a "
            f"loss or weight norm may reach), or 0 to stop on NaN and Inf only, got {cfg.train.divergence_factor}")
    _check_data(cfg, source)
    _check_rule_choice(cfg, source)
    _check_stream(cfg, source)
    if cfg.rule.bptt_window is not None and cfg.rule.bptt_window < 1:
        raise ConfigError(f"{source}: 'rule.bptt_window' must be >= 1 or null, got {cfg.rule.bptt_window}")


def _check_stream(cfg: Config, source: str) -> None:
    s = cfg.stream
    for key in ("window_steps", "min_ms", "downsample", "phase_segments", "segment_ms", "plot_every"):
        if getattr(s, key) < 1:
            raise ConfigError(f"{source}: 'stream.{key}' must be >= 1, got {getattr(s, key)}")
    if s.max_ms < s.min_ms:
        raise ConfigError(f"{source}: 'stream.max_ms' ({s.max_ms}) must be >= 'stream.min_ms' ({s.min_ms})")
    for key in ("steps", "passes", "learn_until_segment"):
        value = getattr(s, key)
        if value is not None and value < 0:
            raise ConfigError(f"{source}: 'stream.{key}' must be >= 0 or null, got {value}")
    if s.checkpoint_every_steps < 0 or s.checkpoint_every_s < 0:
        raise ConfigError(f"{source}: 'stream.checkpoint_every_steps' and 'stream.checkpoint_every_s' must be >= 0")
    if not 0 < s.label_fraction <= 1:
        raise ConfigError(f"{source}: 'stream.label_fraction' must be in (0, 1], got {s.label_fraction}")
    if s.parallel < 1:
        raise ConfigError(f"{source}: 'stream.parallel' must be >= 1, got {s.parallel}")
    if s.parallel > 1 and (s.source != "motion" or s.min_ms != s.max_ms):
        raise ConfigError(f"{source}: 'stream.parallel' > 1 needs stream.source 'motion' with segments of one "
                          f"length (stream.min_ms = stream.max_ms, now {s.min_ms} and {s.max_ms})")
    if s.source == "aedat4" and not s.path:
        raise ConfigError(f"{source}: stream.source 'aedat4' needs 'stream.path', the AEDAT4 file")


def _check_data(cfg: Config, source: str) -> None:
    """The size and shape settings of ``data``, against each other and the dataset's sensor."""
    d = cfg.data
    if d.test_timesteps is not None:
        if not d.test_timesteps > 0:
            raise ConfigError(f"{source}: 'data.test_timesteps' must be > 0 or null (= data.timesteps), got {d.test_timesteps}")
        if not cfg.rule.burn_in < d.test_timesteps:
            raise ConfigError(
                f"{source}: 'rule.burn_in' ({cfg.rule.burn_in}) must be below data.test_timesteps "
                f"({d.test_timesteps}), or no test step would be scored")
    if d.crop is not None and not d.crop > 0:
        raise ConfigError(f"{source}: 'data.crop' must be > 0 or null (no crop), got {d.crop}")
    if d.sensor_size is not None and not all(v > 0 for v in d.sensor_size):
        raise ConfigError(f"{source}: 'data.sensor_size' must be three sizes > 0 [width, height, polarities], "
                          f"got {list(d.sensor_size)}")
    if d.classes is not None:
        if not d.classes:
            raise ConfigError(f"{source}: 'data.classes' must name at least one class, or be null")
        repeated = sorted({c for c in d.classes if d.classes.count(c) > 1})
        if repeated:
            raise ConfigError(f"{source}: 'data.classes' names {quote(repeated[0])} more than once")
    for key in ("sensor_size", "classes"):
        if getattr(d, key) is not None and d.dataset != "folder":
            raise ConfigError(f"{source}: 'data.{key}' is for data.dataset 'folder'; {d.dataset!r} "
                              "has its own")
    if d.dataset == "embedded":
        # The embedded recordings are made as 32 x 32 frames of data.timesteps bins of 1 ms.
        for key, default in (("crop", None), ("downsample", 1), ("test_timesteps", None), ("dt_us", 1000),
                             ("random_slice", False)):
            if getattr(d, key) != default:
                raise ConfigError(f"{source}: 'data.{key}' applies to recorded datasets, not to "
                                  f"'embedded', whose frames are made at their final size; remove it")
        return
    from .data.sensors import KNOWN_SENSORS, geometry_problem

    sensor = KNOWN_SENSORS.get(d.dataset) or d.sensor_size
    if sensor is not None:
        name = d.dataset if d.dataset != "folder" else f"{d.root} (data.sensor_size)"
        problem = geometry_problem(d, tuple(sensor), name)
        if problem is not None:
            raise ConfigError(f"{source}: {problem}")


def _check_rule_choice(cfg: Config, source: str) -> None:
    """The options of the rules (stllr, bptt, error-triggered decolle) and the LIF neuron."""
    r, n = cfg.rule, cfg.network
    if not 0 <= n.lif.gamma < 1:
        raise ConfigError(f"{source}: 'network.lif.gamma' is a decay per step and must be in [0, 1), got {n.lif.gamma}")
    if not n.lif.v_th > 0:
        raise ConfigError(f"{source}: 'network.lif.v_th' must be > 0, got {n.lif.v_th}")
    for i, layer in enumerate(n.layers):
        if layer.recurrent and (layer.type != "dense" or n.neuron_model != "lif"):
            raise ConfigError(f"{source}: 'network.layers.{i}.recurrent' needs a dense layer and network.neuron_model: lif")
    if r.name == "stllr" and n.neuron_model != "lif":
        raise ConfigError(f"{source}: rule 'stllr' trains soft-reset LIF neurons: set network.neuron_model: lif (or use a stllr-* preset)")
    if r.name == "stllr" and (r.reg1 or r.reg2):
        raise ConfigError(f"{source}: 'rule.reg1' and 'rule.reg2' apply to the decolle and bptt rules only; set them to 0 for stllr")
    if r.loss not in ("smooth_l1", "mse", "cross_entropy") and not any(c in r.loss for c in ".:"):
        raise ConfigError(f"{source}: 'rule.loss' must be smooth_l1, mse, cross_entropy or the dotted "
                          f"import path of a cost (package.module:function), got {quote(r.loss)}")
    lp, lq, _, _ = r.stllr.factors
    if not (0 <= lp <= 1 and 0 <= lq <= 1):
        raise ConfigError(f"{source}: 'rule.stllr.factors' lambda_post and lambda_pre must be in [0, 1], got {list(r.stllr.factors)}")
    et = r.error_trigger
    if et.threshold is not None or et.target_rate is not None:
        if r.name != "decolle":
            raise ConfigError(f"{source}: 'rule.error_trigger' is an option of the decolle rule, not of {r.name!r}")
        if et.threshold is not None and et.threshold < 0:
            raise ConfigError(f"{source}: 'rule.error_trigger.threshold' must be >= 0, got {et.threshold}")
        if et.target_rate is not None and not 0 < et.target_rate < 1:
            raise ConfigError(f"{source}: 'rule.error_trigger.target_rate' must be in (0, 1), got {et.target_rate}")
        if not et.adapt > 0:
            raise ConfigError(f"{source}: 'rule.error_trigger.adapt' must be > 0, got {et.adapt}")


def apply_override(data: dict, assignment: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to a nested dict in place."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {quote(assignment)}: expected key=value, for example optim.lr=0.002")
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw
    node: Any = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_index(part, node, key)]
            continue
        if part not in node or node[part] is None:
            node[part] = {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[_index(last, node, key)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"--set {quote(assignment)}: '{_clip('.'.join(parts[:-1]))}' is not a mapping")


def _index(part: str, node: list, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"--set {_clip(key)}: '{_clip(part)}' is not an index of a list of {len(node)} items")
    return int(part)


def override_config(cfg: Config, overrides: list[str]) -> Config:
    """``cfg`` with ``key=value`` overrides, validated as ``load_config`` validates them."""
    data = to_dict(cfg)
    for assignment in overrides:
        key = assignment.partition("=")[0]
        _check_path(key.split("."), source=f"--set {_clip(assignment)}")
        apply_override(data, assignment)
    return config_from_dict(data, "config with --set overrides") if overrides else cfg


def load_config(path_or_preset: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then a YAML file or a preset name, then ``key=value`` overrides."""
    data: dict = dataclasses.asdict(Config())
    source = "defaults"
    if path_or_preset is not None:
        path = Path(path_or_preset)
        if not path.exists() and (PRESET_DIR / f"{path_or_preset}.yaml").exists():
            path = PRESET_DIR / f"{path_or_preset}.yaml"
        if not path.exists():
            raise ConfigError(
                f"config {str(path_or_preset)!r} is neither a file nor a preset; presets: "
                f"{', '.join(presets()) or 'none'}"
            )
        try:
            loaded = yaml.safe_load(_read_config_text(path)) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}: not valid YAML{where}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config must be a mapping of keys to values")
        source = str(path)
        _check_keys(loaded, Config, "", source)
        data = _merge(data, loaded)
    for assignment in overrides:
        # Validate the key before merging so a typo names the key, not a later symptom.
        key = assignment.partition("=")[0]
        _check_path(key.split("."), source=f"--set {_clip(assignment)}")
        apply_override(data, assignment)
        source = "config with --set overrides"
    return config_from_dict(data, source)


def _read_config_text(path: Path) -> str:
    """The text of a config file, read with a bound (a config is small; a path to /dev/zero
    or a large binary file must not fill the memory)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except IsADirectoryError:
        raise ConfigError(f"{path}: a directory, not a config file") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read it: {err.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES // 2**20} MiB, so not a config file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text, so not a config file") from None


def _merge(base: dict, new: dict) -> dict:
    out = dict(base)
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _check_keys(data: dict, cls: type, prefix: str, source: str) -> None:
    _build_names = [f.name for f in dataclasses.fields(cls)]
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in _build_names:
            _build(cls, {key: value}, prefix, source)  # raises the unknown-key error
        if isinstance(value, dict) and dataclasses.is_dataclass(hints[key]):
            _check_keys(value, hints[key], full, source)


def _check_path(parts: list[str], source: str) -> None:
    tp: Any = Config
    prefix = ""
    for part in parts:
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if typing.get_origin(tp) is list:
            tp = typing.get_args(tp)[0]
            prefix = f"{prefix}.{part}"
            continue
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"{source}: '{prefix}' has no sub-keys")
        _check_keys({part: None}, tp, prefix, source)
        tp = typing.get_type_hints(tp)[part]
        prefix = f"{prefix}.{part}" if prefix else part


def to_dict(cfg: Config) -> dict:
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
