"""threefactor: online, local learning in spiking neural networks (DECOLLE, S-TLLR)."""

from .config import Config, load_config
from .errors import ConfigError, RunError
from .model.decolle_public import from_decolle
from .model.layers import DecolleLayer, LIFLayer, LocalReadout
from .model.init import lsuv_init
from .model.network import DecolleNetwork, NetworkOutput, build_network
from .model.neurons import (
    DecolleOutput, DecolleParams, DecolleState, LIFParams, LIFState, decolle_step,
    input_trace_step, lif_step,
)
from .model.surrogates import spike, surrogate_derivative
from .nir import export_nir, from_nir
from .rules import BPTTRule, DecolleRule, STLLRRule, make_rule, predict_sequence
from .run.checkpoint import load_checkpoint, read_checkpoint
from .run.evaluate import evaluate
from .run.from_config import train
from .run.observer import Observer
from .run.trainer import Trainer

__version__ = "0.1.0"
__all__ = [
    "Config", "ConfigError", "load_config", "export_nir", "from_nir", "from_decolle", "DecolleLayer", "LIFLayer",
    "LocalReadout", "DecolleNetwork", "NetworkOutput", "build_network", "lsuv_init",
    "DecolleOutput", "DecolleParams", "DecolleState", "LIFParams", "LIFState", "decolle_step",
    "input_trace_step", "lif_step", "spike", "surrogate_derivative", "BPTTRule", "DecolleRule",
    "STLLRRule", "make_rule", "predict_sequence", "load_checkpoint", "read_checkpoint", "train",
    "Trainer", "Observer", "evaluate", "RunError",
]
