"""Carry a model of the authors' code (nmi-lab/decolle-public, PyPI ``decolle``) over.

``from_decolle`` reads a ``LenetDECOLLE`` (a live module, or its ``state_dict`` / checkpoint
with the parameters YAML it was trained with) and builds a :class:`DecolleNetwork` that
computes what it computes: same weights, readouts (G and their fixed bias), decays,
surrogate, and the authors' formulation of the neuron (``ordering="lagged"``,
``refractory="before_pool"``, and for their fast-sigmoid neurons ``spike_at_zero=False``).
``tests/test_decolle_public.py`` runs their code side by side to show it.

Nothing here imports ``decolle`` (GPL): a live module is read through its attributes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from .layers import DecolleLayer, LocalReadout
from .network import DecolleNetwork
from .neurons import DecolleParams

# sg_function of the authors' neuron classes -> (our surrogate, whether U = 0 spikes)
_SPIKE_FUNCTIONS = {
    "FastSigmoid": ("fast_sigmoid", False),
    "SmoothStep": ("boxcar", True),
    "SigmoidStep": ("sigmoid", True),
}
# Their neuron classes with other dynamics than DECOLLE's Eq. 4 (their own comments say so).
_OTHER_DYNAMICS = {
    "BaseLIFLayer": "input traces scaled by tau instead of (1 - decay)",
    "LIFLayerNonorm": "input traces without the (1 - decay) factors",
    "LIFLayerRefractory": "a refractory term driven by the membrane instead of a constant",
    "LIFLayerVariableTau": "a decay per neuron",
}


class DecolleImportError(ValueError):
    """A model of the authors' code that cannot be carried over exactly."""


def from_decolle(
    model: nn.Module | Mapping[str, Any] | str | Path,
    params: Mapping[str, Any] | str | Path | None = None,
) -> DecolleNetwork:
    """A :class:`DecolleNetwork` equal to the authors' ``LenetDECOLLE`` ``model``.

    ``model`` is the live module, or (with ``params``, the dict or YAML file of their training
    script's parameters) its ``state_dict``, a checkpoint dict holding ``model_state_dict``,
    or the path of such a checkpoint (``epochNNNNN.tar``, loaded with ``weights_only=True``).
    The network is in training mode, on the device and in the dtype of the weights.
    """
    if isinstance(model, nn.Module):
        return _from_module(model)
    if params is None:
        raise DecolleImportError(
            "from_decolle: a state_dict needs the parameters it was built with "
            "(params=the dict or YAML file given to their training script)")
    state = _state_dict(model)
    return _from_state_dict(state, _params(params))


# --- a live LenetDECOLLE -----------------------------------------------------------------


def _from_module(model: nn.Module) -> DecolleNetwork:
    for attr in ("LIF_layers", "pool_layers", "readout_layers", "dropout_layers"):
        if not hasattr(model, attr):
            raise DecolleImportError(f"from_decolle: {type(model).__name__} has no {attr!r}; "
                                     "expected the authors' LenetDECOLLE")
    if getattr(model, "with_output_layer", False):
        raise DecolleImportError(
            "from_decolle: the model has with_output_layer=True; its last layer is read out "
            "through sigmoid(U) without a local readout, which threefactor does not model")
    layers, readouts, dropouts = [], [], []
    for i, (lif, pool, readout, dropout) in enumerate(zip(
            model.LIF_layers, model.pool_layers, model.readout_layers, model.dropout_layers)):
        where = f"LIF_layers[{i}]"
        kind = type(lif).__name__
        if kind in _OTHER_DYNAMICS:
            raise DecolleImportError(f"from_decolle: {where} is a {kind}, whose dynamics differ "
                                     f"from DECOLLE's ({_OTHER_DYNAMICS[kind]})")
        if kind != "LIFLayer":
            raise DecolleImportError(f"from_decolle: {where} is a {kind}; only LIFLayer converts")
        if not getattr(lif, "do_detach", True):
            raise DecolleImportError(f"from_decolle: {where} does not detach its state "
                                     "(learning_method is not 'rtrl'): that is BPTT, not DECOLLE")
        gain = float(getattr(lif, "gain", 1))
        if gain != 1.0:
            raise DecolleImportError(f"from_decolle: {where} has input gain {gain}; only 1 converts")
        fn_name = getattr(getattr(lif.sg_function, "__self__", None), "__name__", None)
        if fn_name not in _SPIKE_FUNCTIONS:
            raise DecolleImportError(f"from_decolle: {where} spikes through {lif.sg_function!r}; "
                                     f"known: {', '.join(_SPIKE_FUNCTIONS)}")
        surrogate, at_zero = _SPIKE_FUNCTIONS[fn_name]
        params = _authors_params(lif.alpha, lif.beta, lif.alpharp, lif.wrp, at_zero)
        layers.append(DecolleLayer(_copy_synapse(lif.base_layer, where), params,
                                   _pool_kernel(pool, where), surrogate))
        if not isinstance(readout, nn.Linear):
            raise DecolleImportError(f"from_decolle: readout_layers[{i}] is {type(readout).__name__}, "
                                     "not a fixed nn.Linear (lc_ampl was None?)")
        readouts.append(LocalReadout.from_weights(readout.weight, readout.bias))
        dropouts.append(dropout.p if isinstance(dropout, nn.Dropout) else 0.0)
    return DecolleNetwork(layers, readouts, _one_dropout(dropouts)).train()


def _copy_synapse(base: nn.Module, where: str) -> nn.Linear | nn.Conv2d:
    w = base.weight.detach()
    kw = dict(bias=base.bias is not None, device=w.device, dtype=w.dtype)
    if type(base) is nn.Conv2d:
        if base.padding_mode != "zeros" or isinstance(base.padding, str):
            raise DecolleImportError(f"from_decolle: {where}.base_layer pads with {base.padding!r} "
                                     f"({base.padding_mode}); only zero padding converts")
        syn: nn.Module = nn.Conv2d(base.in_channels, base.out_channels, base.kernel_size,
                                   base.stride, base.padding, base.dilation, base.groups, **kw)
    elif type(base) is nn.Linear:
        syn = nn.Linear(base.in_features, base.out_features, **kw)
    else:
        raise DecolleImportError(f"from_decolle: {where}.base_layer is a {type(base).__name__}; "
                                 "only nn.Conv2d and nn.Linear convert")
    with torch.no_grad():
        syn.weight.copy_(w)
        if base.bias is not None:
            syn.bias.copy_(base.bias.detach())
    return syn


def _pool_kernel(pool: nn.Module, where: str) -> int:
    if isinstance(pool, nn.Sequential) and len(pool) == 0:
        return 1
    if isinstance(pool, nn.MaxPool2d):
        k, stride = pool.kernel_size, pool.stride
        if (isinstance(k, int) and stride in (k, (k, k)) and pool.padding in (0, (0, 0))
                and pool.dilation in (1, (1, 1)) and not pool.ceil_mode):
            return k
    raise DecolleImportError(f"from_decolle: the pooling after {where} is {pool!r}; only "
                             "non-overlapping square max-pooling converts")


# --- a state_dict and the parameters YAML ------------------------------------------------


def _state_dict(model: Mapping[str, Any] | str | Path) -> Mapping[str, Tensor]:
    if isinstance(model, (str, Path)):
        try:
            model = torch.load(model, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file is one sentence
            raise DecolleImportError(f"from_decolle: cannot read checkpoint {model}: "
                                     f"{type(err).__name__}: {str(err)[:200]}") from None
    if "model_state_dict" in model:
        model = model["model_state_dict"]
    return model


def _params(params: Mapping[str, Any] | str | Path) -> Mapping[str, Any]:
    if isinstance(params, (str, Path)):
        try:
            with open(params) as f:
                params = yaml.safe_load(f)
        except (OSError, yaml.YAMLError) as err:
            raise DecolleImportError(f"from_decolle: cannot read parameters {params}: {err}") from None
    if not isinstance(params, Mapping):
        raise DecolleImportError("from_decolle: the parameters are not a mapping of names to values")
    return params


def _per_layer(params: Mapping[str, Any], key: str, n: int, default: Any) -> list:
    """A per-layer list as LenetDECOLLE expands it: a single value (or one-element list) for all."""
    value = params.get(key, default)
    if not isinstance(value, (list, tuple)):
        value = [value]
    return list(value) * n if len(value) == 1 else list(value)


def _from_state_dict(state: Mapping[str, Tensor], params: Mapping[str, Any]) -> DecolleNetwork:
    n = 0
    while f"LIF_layers.{n}.base_layer.weight" in state:
        n += 1
    if n == 0:
        raise DecolleImportError("from_decolle: the state_dict has no 'LIF_layers.0.base_layer.weight'; "
                                 "expected a LenetDECOLLE state_dict")
    if params.get("with_output_layer", False):
        raise DecolleImportError("from_decolle: with_output_layer=True is not modelled by threefactor")
    n_conv = int(params.get("num_conv_layers", 0))
    try:
        alpha = _per_layer(params, "alpha", n, [0.9])
        beta = _per_layer(params, "beta", n, [0.85])
        alpharp = _per_layer(params, "alpharp", n, [0.65])
        wrp = _per_layer(params, "wrp", n, [1.0])
        pools = _per_layer(params, "pool_size", n_conv, [1]) if n_conv else []
        strides = _per_layer(params, "stride", n_conv, [1]) if n_conv else []
        dropouts = _per_layer(params, "dropout", n, [0.5])  # their script's fallback
    except TypeError as err:
        raise DecolleImportError(f"from_decolle: malformed parameters: {err}") from None
    layers, readouts = [], []
    for i in range(n):
        prefix = f"LIF_layers.{i}."
        w, b = state[prefix + "base_layer.weight"], state.get(prefix + "base_layer.bias")
        # LenetDECOLLE hands its MLP layers the decays of index i - n_conv (its own indexing).
        j = i if i < n_conv else i - n_conv
        params_i = _authors_params(alpha[j], beta[j], alpharp[j], wrp[j], at_zero=False)
        _check_tau(state, prefix, params_i, i)
        if w.dim() == 4:
            if i >= n_conv:
                raise DecolleImportError(f"from_decolle: layer {i} is a convolution but "
                                         f"num_conv_layers is {n_conv}")
            k = w.shape[-1]
            syn: nn.Module = nn.Conv2d(w.shape[1], w.shape[0], k, strides[i], (k - 1) // 2,
                                       bias=b is not None, dtype=w.dtype)
            pool = int(pools[i])
        else:
            syn = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype)
            pool = 1
        with torch.no_grad():
            syn.weight.copy_(w)
            if b is not None:
                syn.bias.copy_(b)
        layers.append(DecolleLayer(syn, params_i, pool, "fast_sigmoid"))
        g = state.get(f"readout_layers.{i}.weight")
        if g is None:
            raise DecolleImportError(f"from_decolle: the state_dict has no readout_layers.{i}.weight")
        readouts.append(LocalReadout.from_weights(g, state.get(f"readout_layers.{i}.bias")))
    return DecolleNetwork(layers, readouts, _one_dropout(dropouts[:n])).train()


def _check_tau(state: Mapping[str, Tensor], prefix: str, params: DecolleParams, i: int) -> None:
    """Their modules store tau_m = 1 / (1 - alpha), tau_s = 1 / (1 - beta): a mismatch means
    other decays than the YAML's (e.g. random_tau, a decay per neuron)."""
    for key, decay in (("tau_m", params.alpha), ("tau_s", params.beta)):
        tau = state.get(prefix + key)
        if tau is None:
            continue
        if tau.numel() != 1:
            raise DecolleImportError(f"from_decolle: layer {i} has a {key} per neuron; only one "
                                     "decay per layer converts")
        if not math.isclose(1.0 - 1.0 / float(tau), decay, rel_tol=0, abs_tol=1e-5):
            raise DecolleImportError(
                f"from_decolle: layer {i}'s {key} = {float(tau):.6g} does not match the "
                f"parameters' decay {decay:.6g}; pass the parameters the model was trained with")


# --- shared ------------------------------------------------------------------------------


def _authors_params(alpha: Any, beta: Any, alpharp: Any, wrp: Any, at_zero: bool) -> DecolleParams:
    # Their decays are float32 tensors (torch.tensor(alpha)); rounding them the same way keeps
    # float64 runs equal to theirs to the last bits.
    def f32(v: Any) -> float:
        return float(torch.as_tensor(v, dtype=torch.float32))

    return DecolleParams(alpha=f32(alpha), beta=f32(beta), gamma=float(alpharp), rho=float(wrp),
                         ordering="lagged", refractory="before_pool", spike_at_zero=at_zero)


def _one_dropout(ps: list[float]) -> float:
    if len(set(ps)) > 1:
        raise DecolleImportError(f"from_decolle: the readouts' dropout differs per layer ({ps}); "
                                 "threefactor has one dropout for all readouts")
    return float(ps[0]) if ps else 0.0
