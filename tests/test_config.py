"""Config: a typo or a bad value is one sentence naming the key, never a traceback later."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from threefactor.config import (
    Config,
    ConfigError,
    LayerConfig,
    config_from_dict,
    dump_config,
    load_config,
    to_dict,
)


def _error(overrides=(), path=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    msg = str(info.value)
    assert "\n" not in msg, msg  # one line
    return msg


def _yaml(tmp_path, text: str):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


# --- unknown keys -----------------------------------------------------------------------

UNKNOWN = [
    # (override, named key, suggestion, some valid keys of that level)
    ("optim.lrr=1", "optim.lrr", "lr", ["name", "lr", "betas", "lr_decay_every"]),
    ("tarin.epochs=1", "tarin", "train", ["seed", "device", "data", "network", "rule", "optim", "train"]),
    ("network.neuron.alpah=0.9", "network.neuron.alpah", "alpha", ["alpha", "beta", "gamma", "rho", "ordering"]),
    ("network.layers.0.chanels=4", "network.layers.0.chanels", "channels", ["type", "channels", "kernel", "pool", "padding"]),
    ("data.n_trian=5", "data.n_trian", "n_train", ["dataset", "n_train", "n_test", "timesteps"]),
]


@pytest.mark.parametrize("override,key,suggestion,valid", UNKNOWN)
def test_unknown_key_in_override_names_key_suggestion_and_valid_keys(override, key, suggestion, valid):
    msg = _error([override])
    assert f"'{key}'" in msg
    assert f"did you mean '{suggestion}'" in msg
    for v in valid:
        assert v in msg


def _nest(dotted: str, value) -> dict:
    """'a.b.0.c' -> {'a': {'b': [{'c': value}]}} (list indices become one-element lists)."""
    parts = dotted.split(".")
    node: object = value
    for part in reversed(parts):
        node = [node] if part.isdigit() else {part: node}
    return node  # type: ignore[return-value]


@pytest.mark.parametrize("override,key,suggestion,valid", UNKNOWN)
def test_unknown_key_in_yaml_file_names_key_suggestion_and_valid_keys(tmp_path, override, key, suggestion, valid):
    dotted, _, raw = override.partition("=")
    path = _yaml(tmp_path, yaml.safe_dump(_nest(dotted, yaml.safe_load(raw))))
    msg = _error(path=path)
    assert str(path) in msg
    assert f"'{key}'" in msg
    assert f"did you mean '{suggestion}'" in msg
    for v in valid:
        assert v in msg


def test_unknown_key_without_close_match_has_no_suggestion():
    msg = _error(["optim.zzzzzz=1"])
    assert "'optim.zzzzzz'" in msg and "did you mean" not in msg and "lr_decay_factor" in msg


def test_list_index_out_of_range_is_a_config_error():
    msg = _error(["network.layers.7.channels=4"])
    assert "7" in msg and "3" in msg
    _error(["network.layers.x.channels=4"])


def test_override_without_equals_or_into_a_scalar():
    assert "key=value" in _error(["optim.lr"])
    assert "'optim.lr'" in _error(["optim.lr.x=1"])


# --- wrong types and out-of-range values -------------------------------------------------


@pytest.mark.parametrize(
    "override,key",
    [
        ("optim.lr=abc", "optim.lr"),
        ("train.epochs=1.5", "train.epochs"),
        ("train.epochs=true", "train.epochs"),
        ("network.surrogate=foo", "network.surrogate"),
        ("network.neuron.ordering=backwards", "network.neuron.ordering"),
        ("rule.loss=l2", "rule.loss"),
        ("train.progress=maybe", "train.progress"),
        ("optim.betas=[0.1]", "optim.betas"),
        ("optim.betas=[a, 0.9]", "optim.betas"),
        ("network.layers=5", "network.layers"),
        ("network.layers.0.type=recurrent", "network.layers.0.type"),
        ("optim=5", "optim"),
        ("seed=abc", "seed"),
        ("device=3", "device"),
    ],
)
def test_wrong_type_names_the_key(override, key):
    msg = _error([override])
    assert f"'{key}" in msg


def test_wrong_type_in_yaml_names_file_and_key(tmp_path):
    path = _yaml(tmp_path, "train:\n  epochs: many\n")
    msg = _error(path=path)
    assert str(path) in msg and "'train.epochs'" in msg
    path = _yaml(tmp_path, "network:\n  layers:\n    - {type: conv, channels: four}\n")
    assert "'network.layers.0.channels'" in _error(path=path)


@pytest.mark.parametrize(
    "override,key",
    [
        ("optim.lr=0", "optim.lr"),
        ("optim.lr=-0.1", "optim.lr"),
        ("network.neuron.alpha=1.0", "network.neuron.alpha"),
        ("network.neuron.beta=-0.1", "network.neuron.beta"),
        ("network.neuron.gamma=1.5", "network.neuron.gamma"),
        ("network.dropout=1.0", "network.dropout"),
        ("rule.burn_in=60", "rule.burn_in"),  # must be < data.timesteps (60 by default)
        ("rule.burn_in=-1", "rule.burn_in"),
        ("train.epochs=-1", "train.epochs"),
        ("train.batch_size=0", "train.batch_size"),
        ("data.n_train=0", "data.n_train"),
        ("data.timesteps=0", "data.timesteps"),
        ("data.threshold=0", "data.threshold"),
        ("network.layers.0.channels=0", "network.layers.0"),
        ("network.layers.1.pool=0", "network.layers.1"),
        ("optim.layer_lr_scale=[1.0, 2.0]", "optim.layer_lr_scale"),
        ("network.layers=[]", "network.layers"),
    ],
)
def test_out_of_range_value_names_the_key(override, key):
    assert f"'{key}" in _error([override])


@pytest.mark.parametrize(
    "override,key",
    [
        # each passes validation today, then crashes the run with a traceback ...
        ("optim.lr_decay_factor=0", "optim.lr_decay_factor"),  # ZeroDivisionError in train()
        ("optim.betas=[0.0, 1.5]", "optim.betas"),  # ValueError from torch.optim.Adamax
        ("network.layers.0.padding=-1", "network.layers.0"),  # RuntimeError from conv2d
        # ... or is silently misread
        ("optim.layer_lr_scale=[1.0, -1.0, 1.0]", "optim.layer_lr_scale"),  # gradient *ascent* on layer 2
        ("data.noise_rate_hz=-1", "data.noise_rate_hz"),  # treated as 0
    ],
)
def test_values_that_would_break_the_run_are_rejected_up_front(override, key):
    assert f"'{key}" in _error([override])


def test_burn_in_checked_against_overridden_timesteps():
    assert load_config(None, ["data.timesteps=12", "rule.burn_in=11"]).rule.burn_in == 11
    assert "'rule.burn_in'" in _error(["data.timesteps=12", "rule.burn_in=12"])


# --- numbers as people write them ------------------------------------------------------------


@pytest.mark.parametrize("text,value", [("1e-3", 1e-3), ("3.6e-4", 3.6e-4), ("2E-3", 2e-3), ("0.002", 0.002), ("1", 1.0)])
def test_float_written_in_scientific_notation_is_accepted(tmp_path, text, value):
    """PyYAML (YAML 1.1) reads '1e-3' as a string; a learning rate written so must still work."""
    assert load_config(None, [f"optim.lr={text}"]).optim.lr == pytest.approx(value)
    path = _yaml(tmp_path, f"optim:\n  lr: {text}\n")
    assert load_config(path).optim.lr == pytest.approx(value)


# --- loading, merging and the round trip ------------------------------------------------


def test_defaults_without_arguments():
    assert load_config() == Config()


def test_yaml_merges_into_defaults_and_overrides_win(tmp_path):
    path = _yaml(tmp_path, "optim:\n  lr: 0.01\ntrain:\n  epochs: 7\n")
    cfg = load_config(path, ["train.epochs=2", "network.layers.1.channels=5", "optim.betas=[0.1, 0.9]"])
    assert cfg.optim.lr == 0.01
    assert cfg.optim.betas == (0.1, 0.9)  # a tuple, as the dataclass says
    assert cfg.train.epochs == 2
    assert cfg.optim.name == Config().optim.name  # untouched keys keep their defaults
    assert [l.channels for l in cfg.network.layers] == [16, 5, 32]
    assert all(isinstance(l, LayerConfig) for l in cfg.network.layers)


def test_yaml_layer_list_replaces_the_default_list(tmp_path):
    path = _yaml(tmp_path, "network:\n  layers:\n    - {type: dense, channels: 10, pool: 1}\n")
    cfg = load_config(path)
    assert cfg.network.layers == [LayerConfig("dense", 10, 5, 1, None)]


def test_missing_file_invalid_yaml_and_non_mapping_are_config_errors(tmp_path):
    assert "missing.yaml" in _error(path=tmp_path / "missing.yaml")
    assert "line" in _error(path=_yaml(tmp_path, "optim: [1, 2\n"))
    assert "mapping" in _error(path=_yaml(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError):
        config_from_dict([1, 2])  # type: ignore[arg-type]


def _non_default() -> Config:
    cfg = Config()
    cfg.seed = 7
    cfg.device = "cpu"
    cfg.data.n_train, cfg.data.timesteps, cfg.data.speed = 64, 30, 0.25
    cfg.network.layers = [LayerConfig("conv", 8, 3, 2, 0), LayerConfig("dense", 12, 5, 1, None)]
    cfg.network.neuron.alpha, cfg.network.neuron.ordering = 0.9, "lagged"
    cfg.network.surrogate, cfg.network.feedback_alignment = "sigmoid", True
    cfg.network.dropout, cfg.network.init = 0.25, "default"
    cfg.rule.loss, cfg.rule.reg1, cfg.rule.burn_in = "mse", 1e-6, 5
    cfg.optim.name, cfg.optim.lr, cfg.optim.betas = "adam", 1e-5, (0.5, 0.999)
    cfg.optim.layer_lr_scale = [1.0, 0.3]
    cfg.optim.lr_decay_every, cfg.optim.lr_decay_factor = 2, 3.0
    cfg.train.epochs, cfg.train.progress = 0, False
    cfg.distributed.sync, cfg.distributed.average_every = "periodic", 10
    cfg.stream.scenario, cfg.stream.steps, cfg.stream.passes = "domain_shift", None, 3
    return cfg


@pytest.mark.parametrize("cfg", [Config(), _non_default()], ids=["defaults", "non_default"])
def test_dump_then_load_is_the_identity(tmp_path, cfg):
    text = dump_config(cfg)
    path = _yaml(tmp_path, text)
    back = load_config(path)
    assert back == cfg
    assert to_dict(back) == to_dict(cfg)
    assert dump_config(back) == text
    assert config_from_dict(yaml.safe_load(text)) == cfg


def test_non_default_config_differs_in_every_section():
    a, b = dataclasses.asdict(Config()), dataclasses.asdict(_non_default())
    assert all(a[k] != b[k] for k in a)
