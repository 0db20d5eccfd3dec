"""Learning rules: each decides what to detach, which losses to form and when to step."""

from .decolle import DecolleRule, SequenceResult, local_loss, predict_sequence, regulariser

__all__ = ["DecolleRule", "SequenceResult", "local_loss", "predict_sequence", "regulariser"]
