"""User-defined local costs for DECOLLE: ``cost(readout, target, layer_index) -> scalar``.

Any such function trains with ``DecolleRule(net, opt, loss=hinge)`` or, from the command line,
``PYTHONPATH=examples threefactor train --set rule.loss=costs:hinge``: the update of every layer
follows from the cost by autograd inside that layer and time step (docs/rules.md).
"""

from __future__ import annotations

import torch
from torch import Tensor


def hinge(readout: Tensor, target: Tensor, layer: int) -> Tensor:
    """Multi-class hinge (Crammer-Singer margins of 1) on the readout (B, C) against class
    indices (B,): only classes within the margin of the true one are pushed down."""
    true = readout.gather(1, target[:, None])
    margins = torch.relu(1.0 + readout - true).scatter(1, target[:, None], 0.0)
    return margins.sum(1).mean()
