"""Learning that never stops: online learning on unbounded event streams."""
