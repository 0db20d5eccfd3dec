"""threefactor: online, local learning in spiking neural networks (DECOLLE, S-TLLR)."""

from .config import Config, ConfigError, load_config
from .layers import DecolleLayer, LocalReadout
from .network import DecolleNetwork, NetworkOutput, build_network, lsuv_init
from .neurons import (
    DecolleOutput, DecolleParams, DecolleState, decolle_step, input_trace_step, spike,
    surrogate_derivative,
)
from .rules.decolle import DecolleRule, predict_sequence
from .train import load_checkpoint, train

__version__ = "0.1.0"
__all__ = [
    "Config", "ConfigError", "load_config", "DecolleLayer", "LocalReadout", "DecolleNetwork",
    "NetworkOutput", "build_network", "lsuv_init", "DecolleOutput", "DecolleParams",
    "DecolleState", "decolle_step", "input_trace_step", "spike", "surrogate_derivative",
    "DecolleRule", "predict_sequence", "load_checkpoint", "train",
]
